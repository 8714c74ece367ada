//! body_match: searches a response body for a needle as it streams in, on a blocking
//! thread, through a sliding window, after undoing its `Content-Encoding`.
//!
//! - The window keeps the last `needle.len() - 1` bytes of each chunk, so a needle split
//!   across chunks (or across decoder output) is found; memory stays at one chunk plus
//!   the needle whatever the body's size.
//! - At most `MAX_SEARCHED` (64 MiB) of decoded body is searched, and at most that much
//!   of the wire body is handed to the decoder: a huge page or a compression bomb costs
//!   bounded CPU. The transfer itself is still read to its end (for its timing).
//! - gzip (and x-gzip), deflate (zlib-wrapped as RFC 9110 says, raw deflate as some
//!   servers send it) and br are decoded, also stacked (`gzip, br`), with flate2 and
//!   brotli-decompressor (well-kept decoders; the brotli one is what the `brotli` crate
//!   itself uses). Another coding cannot be searched and says so.
//! - Decoding and searching run on tokio's blocking pool, fed over an unbounded channel
//!   of the hyper body's own chunks (no copy), so the probe never waits for the search
//!   and the transfer time is the network's.

use std::cell::RefCell;
use std::io::{self, Write};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;

/// The most of a (decoded) body that is searched.
pub const MAX_SEARCHED: u64 = 64 << 20;

/// A content coding we can undo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
}

/// The codings of a `Content-Encoding` value, in the order they were applied; `Err` names
/// one we cannot undo.
pub fn codings(header: &str) -> Result<Vec<Coding>, String> {
    header
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .map(|c| match c.as_str() {
            "gzip" | "x-gzip" => Ok(Coding::Gzip),
            "deflate" => Ok(Coding::Deflate),
            "br" => Ok(Coding::Brotli),
            _ => Err(c),
        })
        .collect()
}

/// How a search ended.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Found,
    /// Not in the `searched` decoded bytes; `cut` when the body went on past the bound.
    Absent {
        searched: u64,
        cut: bool,
    },
    /// The body is not what its `Content-Encoding` says.
    Undecodable(String),
}

/// A search in progress: feed it the wire chunks, then `finish`.
pub struct Search {
    chunks: Option<mpsc::Sender<Bytes>>,
    done: Arc<AtomicBool>,
    fed: u64,
    worker: tokio::task::JoinHandle<Verdict>,
}

impl Search {
    pub fn start(needle: &[u8], codings: Vec<Coding>) -> Search {
        let (tx, rx) = mpsc::channel::<Bytes>();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let needle = needle.to_vec();
        let worker = tokio::task::spawn_blocking(move || {
            let window = Rc::new(RefCell::new(Window::new(needle)));
            let mut input = decoders(&codings, Sink(window.clone()));
            let mut failed = None;
            for chunk in rx {
                if let Err(e) = input.write_all(&chunk) {
                    failed = Some(e);
                    break;
                }
            }
            if failed.is_none() {
                failed = input.flush().err();
            }
            drop(input);
            flag.store(true, Ordering::Relaxed);
            let window = window.borrow();
            match failed {
                _ if window.found => Verdict::Found,
                Some(e) if !window.full() => Verdict::Undecodable(e.to_string()),
                _ => Verdict::Absent {
                    searched: window.searched,
                    cut: window.full(),
                },
            }
        });
        Search {
            chunks: Some(tx),
            done,
            fed: 0,
            worker,
        }
    }

    /// Hands a wire chunk to the search, unless it has already decided or has had
    /// `MAX_SEARCHED` bytes.
    pub fn feed(&mut self, chunk: Bytes) {
        if self.fed >= MAX_SEARCHED || self.done.load(Ordering::Relaxed) {
            self.chunks = None;
            return;
        }
        self.fed += chunk.len() as u64;
        if let Some(tx) = &self.chunks {
            let _ = tx.send(chunk);
        }
    }

    pub async fn finish(mut self) -> Verdict {
        self.chunks = None;
        self.worker
            .await
            .unwrap_or_else(|e| Verdict::Undecodable(format!("search failed: {e}")))
    }
}

/// The chain of decoders that turns the wire body into the content: the last coding
/// applied is undone first.
fn decoders(codings: &[Coding], sink: Sink) -> Box<dyn Write> {
    let mut out: Box<dyn Write> = Box::new(sink);
    for coding in codings {
        out = match coding {
            Coding::Gzip => Box::new(flate2::write::MultiGzDecoder::new(out)),
            Coding::Deflate => Box::new(Deflate::Undecided(Some(out))),
            Coding::Brotli => Box::new(brotli_decompressor::DecompressorWriter::new(out, 8192)),
        };
    }
    out
}

/// HTTP's deflate is zlib (RFC 9110 8.4.1.2), but some servers send raw deflate: the first
/// two bytes tell (a zlib header is CM 8 and a multiple of 31).
enum Deflate {
    Undecided(Option<Box<dyn Write>>),
    Zlib(flate2::write::ZlibDecoder<Box<dyn Write>>),
    Raw(flate2::write::DeflateDecoder<Box<dyn Write>>),
}

impl Write for Deflate {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Deflate::Undecided(out) = self {
            let out = out.take().expect("decided once");
            let zlib = data.len() < 2
                || (data[0] & 0x0f == 8
                    && (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 == 0);
            *self = if zlib {
                Deflate::Zlib(flate2::write::ZlibDecoder::new(out))
            } else {
                Deflate::Raw(flate2::write::DeflateDecoder::new(out))
            };
        }
        match self {
            Deflate::Zlib(d) => d.write(data),
            Deflate::Raw(d) => d.write(data),
            Deflate::Undecided(_) => unreachable!("decided above"),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Deflate::Zlib(d) => d.try_finish(),
            Deflate::Raw(d) => d.try_finish(),
            Deflate::Undecided(_) => Ok(()),
        }
    }
}

/// The end of the decoder chain: the search window, shared with the worker that reads
/// the verdict (one thread, so `Rc`).
struct Sink(Rc<RefCell<Window>>);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut window = self.0.borrow_mut();
        if window.found || window.full() {
            // Stops the decoders: nothing more needs decoding.
            return Err(io::Error::other("search decided"));
        }
        window.search(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The needle and the last `needle.len() - 1` bytes seen.
struct Window {
    finder: memchr::memmem::Finder<'static>,
    tail: Vec<u8>,
    searched: u64,
    found: bool,
}

impl Window {
    fn new(needle: Vec<u8>) -> Window {
        Window {
            found: needle.is_empty(),
            finder: memchr::memmem::Finder::new(&needle).into_owned(),
            tail: Vec::new(),
            searched: 0,
        }
    }

    fn full(&self) -> bool {
        self.searched >= MAX_SEARCHED
    }

    fn search(&mut self, data: &[u8]) {
        let room = (MAX_SEARCHED - self.searched) as usize;
        let data = &data[..data.len().min(room)];
        self.searched += data.len() as u64;
        let keep = self.finder.needle().len() - 1;
        // The needle may start in the tail and end in this chunk.
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(&data[..data.len().min(keep)]);
        if self.finder.find(&seam).is_some() || self.finder.find(data).is_some() {
            self.found = true;
            return;
        }
        if data.len() >= keep {
            seam.clear();
            seam.extend_from_slice(&data[data.len() - keep..]);
        } else {
            let cut = seam.len().saturating_sub(keep);
            seam.drain(..cut);
        }
        self.tail = seam;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(needle: &str, codings: Vec<Coding>, chunks: Vec<Vec<u8>>) -> Verdict {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut s = Search::start(needle.as_bytes(), codings);
            for c in chunks {
                s.feed(Bytes::from(c));
            }
            s.finish().await
        })
    }

    #[test]
    fn a_needle_across_chunks_is_found() {
        let chunks: Vec<Vec<u8>> = ["xxxne", "e", "dlexx"]
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        assert_eq!(search("needle", vec![], chunks.clone()), Verdict::Found);
        assert_eq!(
            search("needles", vec![], chunks),
            Verdict::Absent {
                searched: 11,
                cut: false
            }
        );
        let bytes: Vec<Vec<u8>> = "abcneedle".bytes().map(|b| vec![b]).collect();
        assert_eq!(search("needle", vec![], bytes), Verdict::Found);
    }

    #[test]
    fn codings_parse_in_order() {
        assert_eq!(
            codings("gzip, br").unwrap(),
            vec![Coding::Gzip, Coding::Brotli]
        );
        assert_eq!(codings("identity").unwrap(), vec![]);
        assert_eq!(codings("zstd").unwrap_err(), "zstd");
    }

    #[test]
    fn raw_and_zlib_deflate_and_garbage() {
        use flate2::write::{DeflateEncoder, ZlibEncoder};
        let body = b"hello deflated world".repeat(100);
        let mut z = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&body).unwrap();
        let mut r = DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        r.write_all(&body).unwrap();
        for wire in [z.finish().unwrap(), r.finish().unwrap()] {
            assert_eq!(
                search("world", vec![Coding::Deflate], vec![wire]),
                Verdict::Found
            );
        }
        let garbage = search("x", vec![Coding::Gzip], vec![b"not gzip at all".to_vec()]);
        assert!(matches!(garbage, Verdict::Undecodable(_)), "{garbage:?}");
    }
}
