//! The agent's own memory footprint (docs/BENCHMARKS.md "Agent footprint").
//!
//! The dynamic loader reads the executable's relocation table (`.rela.dyn`, about 50,000
//! entries of 24 bytes, 1.2 MB) once, before `main`, to relocate the binary, and nothing
//! reads it again. Its pages stay mapped, though, and count in the agent's RSS as long as
//! it runs. `release_relocation_table` hands the whole pages of the relocation sections
//! back to the kernel (`MADV_DONTNEED` on a clean, private file mapping drops the mapping,
//! not data): were they read again (`.rela.plt` by lazy binding, say), they would be
//! faulted in from the page cache unchanged. A binary built with packed relocations
//! (DT_RELR, `EDGEPROBE_PACK_RELOCS=1`) has only a small table, which rounds to no page.
//!
//! The addresses come from the executable file itself (`/proc/self/exe`, the mapped inode
//! even after an upgrade renamed a new file into place: its program headers and its
//! `SHT_RELA`/`SHT_REL` section headers) and from where `/proc/self/maps` says it is
//! loaded. Only sections that are allocated and lie wholly inside a read-only `PT_LOAD`
//! segment are released, so no written page can lose its contents. Anything unexpected
//! (not a 64-bit little-endian ELF, no section headers, values that overflow) releases
//! nothing.
//!
//! Unsafe code: one `libc::madvise` call, on pages that lie wholly inside this process's
//! own read-only mapping of its relocation table.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Releases the pages of this executable's relocation tables; returns the bytes released.
#[allow(unsafe_code)]
pub fn release_relocation_table() -> io::Result<usize> {
    let exe = File::open("/proc/self/exe")?;
    let header = read_at(&exe, 0, 64)?;
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Ok(0);
    }
    let (phoff, shoff) = (u64_at(&header, 0x20), u64_at(&header, 0x28));
    let (phentsize, phnum) = (u16_at(&header, 0x36), u16_at(&header, 0x38));
    let (shentsize, shnum) = (u16_at(&header, 0x3a), u16_at(&header, 0x3c));
    if shoff == 0 || shentsize < 0x28 || phentsize < 0x38 {
        return Ok(0);
    }
    let page = rustix::param::page_size() as u64;
    // The load bias: where the segment at file offset 0 is mapped, less its address.
    let phdrs = read_at(&exe, phoff, usize::from(phentsize) * usize::from(phnum))?;
    let Some(first_vaddr) = phdrs
        .chunks_exact(phentsize.into())
        .find(|p| u32_at(p, 0) == 1 && u64_at(p, 0x08) == 0)
        .map(|p| u64_at(p, 0x10) & !(page - 1))
    else {
        return Ok(0);
    };
    let Some(mapped_at) = mapped_at_offset_zero()? else {
        return Ok(0);
    };
    let bias = mapped_at.wrapping_sub(first_vaddr);
    // Read-only PT_LOAD segments (p_type 1 without PF_W), as [start, end) addresses.
    let read_only: Vec<(u64, u64)> = phdrs
        .chunks_exact(phentsize.into())
        .filter(|p| u32_at(p, 0) == 1 && u32_at(p, 4) & 2 == 0)
        .filter_map(|p| {
            let vaddr = u64_at(p, 0x10);
            Some((vaddr, vaddr.checked_add(u64_at(p, 0x28))?))
        })
        .collect();
    let shdrs = read_at(&exe, shoff, usize::from(shentsize) * usize::from(shnum))?;
    let mut released = 0;
    for s in shdrs.chunks_exact(shentsize.into()) {
        // SHT_RELA (4) and SHT_REL (9), allocated (SHF_ALLOC): tables the loader read.
        if !matches!(u32_at(s, 4), 4 | 9) || u64_at(s, 8) & 2 == 0 {
            continue;
        }
        let (addr, size) = (u64_at(s, 0x10), u64_at(s, 0x20));
        let Some(end) = addr.checked_add(size) else {
            continue;
        };
        if addr == 0 || !read_only.iter().any(|&(lo, hi)| lo <= addr && end <= hi) {
            continue;
        }
        let (Some(first), Some(last)) = (
            bias.checked_add(addr).and_then(|a| a.checked_add(page - 1)),
            bias.checked_add(end),
        ) else {
            continue;
        };
        let (start, end) = (first & !(page - 1), last & !(page - 1));
        if end <= start {
            continue;
        }
        let len = (end - start) as usize;
        // SAFETY: [start, end) is whole pages inside a read-only segment of this
        // executable's mapping (file offset 0 mapped at `mapped_at`, sections at their
        // addresses plus the same bias), holding a relocation table that no Rust object
        // refers to. MADV_DONTNEED on a clean private file mapping only unmaps the pages; a
        // later read faults them in again from the file, unchanged.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released += len;
    }
    Ok(released)
}

/// Where `/proc/self/maps` says this executable's file offset 0 is mapped.
fn mapped_at_offset_zero() -> io::Result<Option<u64>> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    Ok(maps.lines().find_map(|line| {
        // start-end perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let offset = fields.nth(1)?;
        let path = fields.nth(2)?.trim_start();
        (offset.trim_start_matches('0').is_empty() && path == exe)
            .then(|| u64::from_str_radix(range.split('-').next()?, 16).ok())
            .flatten()
    }))
}

fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
