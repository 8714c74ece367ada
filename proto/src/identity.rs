//! The agent identity a client certificate of the fleet CA carries: the subject's common
//! name, else the first DNS subject alternative name. The collector compares it with the
//! id an agent claims; the agent's `check` compares it with its configured `id`, so both
//! read a certificate by this one rule.

use x509_parser::extensions::GeneralName;

/// The agent id of a certificate (DER), or `None` when it names none or does not parse.
pub fn agent_id_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    })
}
