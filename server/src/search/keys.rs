//! The byte layout of search index entries. One `IndexValue` expands to one or more keys in
//! the `index` column family; every key is `{param prefix}{tag}{payload}` and ends with the
//! resource id, so a prefix scan yields matching ids in order. The param prefix is 5 bytes: a
//! resource type byte and the first 4 bytes of SHA-256 of the parameter code (short keys keep
//! RocksDB's memtable comparisons cheap; `Registry` checks at start that no two codes collide).
//! Presence (for `:missing`) needs no entry: the `values` family has one `ValueRecord` per
//! resource, which names in clear the parameters the resource has and seals their value
//! lists (see `blind`).
//!
//! Personal text is never in a key: `term(..)` is a blinded term (`blind::BlindingKey`), and
//! lookups through one recheck the candidates' stored values where the term is not exact.
//!
//! | tag | payload                        | used by                                        |
//! |-----|--------------------------------|------------------------------------------------|
//! | S   | term(text prefix) \0 id        | string: starts-with, `:exact`; one per prefix  |
//! | P   | term(value) \0 id              | token from an Identifier or ContactPoint       |
//! | T   | code \x01 system \0 id         | other tokens `code`, `system|code`, `|code`    |
//! | Y   | system \0 id                   | token `system|`                                |
//! | X   | normalised text \0 id          | token `:text` (display and concept text)       |
//! | R   | Type/id or URL \0 id           | reference                                      |
//! | D   | target id \0 id                | reference by bare id                           |
//! | I   | term(identifier value) \0 id   | reference `:identifier`                        |
//! | U   | uri \0 id                      | uri                                            |
//! | L   | lo(8) id  -> hi(8)             | date, ordered by start                         |
//! | H   | hi(8) id  -> lo(8)             | date, ordered by end                           |
//!
//! `id` is the resource id in `IdBytes` form: a server-assigned UUID in 16 bytes, read back
//! from the end of the key (a UUID's text was 36 of an S key's 59 bytes).
//!
//! In clear stay what search must compare by order or exact structure and what is not
//! personal text: codes, systems and display texts from terminologies, references (opaque
//! ids), URIs, and dates (ranges need their order). ARCHITECTURE.md says why.

use super::blind::BlindingKey;
use super::value::{decode_values, normalize, IndexValue};
use crate::error::{Error, Result};
use crate::fhir::ResourceType;

pub const SEP: u8 = 0;
pub const FIELD: u8 = 1;

pub const PARAM_PREFIX_LEN: usize = 5;

fn type_byte(rtype: ResourceType) -> u8 {
    ResourceType::ALL
        .iter()
        .position(|t| *t == rtype)
        .expect("served type") as u8
        + 1
}

/// The 4 code bytes of a parameter's prefix. Every write asks for them twice per parameter
/// of the resource; each thread remembers the codes it has hashed (search parameter codes,
/// a few hundred at most; past `REMEMBERED_CODES` it hashes without remembering).
pub fn code_hash(code: &str) -> [u8; 4] {
    const REMEMBERED_CODES: usize = 4096;
    thread_local! {
        static HASHED: std::cell::RefCell<rustc_hash::FxHashMap<Box<str>, [u8; 4]>> =
            Default::default();
    }
    HASHED.with(|hashed| {
        if let Some(h) = hashed.borrow().get(code) {
            return *h;
        }
        use sha2::Digest;
        let d = sha2::Sha256::digest(code.as_bytes());
        let h = [d[0], d[1], d[2], d[3]];
        let mut hashed = hashed.borrow_mut();
        if hashed.len() < REMEMBERED_CODES {
            hashed.insert(code.into(), h);
        }
        h
    })
}

pub fn param_prefix(rtype: ResourceType, code: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(PARAM_PREFIX_LEN + 40);
    k.push(type_byte(rtype));
    k.extend_from_slice(&code_hash(code));
    k
}

/// The keys of a resource's two entries in the `values` family (see `ValueRecord`): its type
/// byte, `PRESENCE` or `LISTS`, and its id.
pub fn values_keys(rtype: ResourceType, id: &str) -> [Vec<u8>; 2] {
    [PRESENCE, LISTS].map(|kind| values_key(rtype, kind, id))
}

/// The key of a resource's lists entry (`values_keys`' second), which rechecks read alone.
pub fn lists_key(rtype: ResourceType, id: &str) -> Vec<u8> {
    values_key(rtype, LISTS, id)
}

fn values_key(rtype: ResourceType, kind: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + id.len());
    k.extend_from_slice(&[type_byte(rtype), kind]);
    IdBytes::push(&mut k, id);
    k
}

const PRESENCE: u8 = b'p';
const LISTS: u8 = b'v';

/// The presence entries of every resource of a type start with this.
pub fn presence_prefix(rtype: ResourceType) -> [u8; 2] {
    [type_byte(rtype), PRESENCE]
}

/// One resource's index values, kept to recheck candidates, sort, and answer `:missing`: for
/// each parameter it has a value for (by its 4 code bytes, in byte order), the encoded value
/// list. Stored as two entries (`values_keys`): the lists entry, `sealed(count (u16) ‖ code
/// bytes × count ‖ (len (u32) ‖ list) × count)` with its key as associated data, and the
/// presence entry, `count ‖ code bytes × count` in clear. Rechecks and sorts read the lists
/// entry alone; `:missing` and candidate scans read only the small presence entries, which
/// name what the keys of the one-entry-per-parameter layout this replaced showed, and, like
/// those keys, are not authenticated. A create writes 4 entries where it wrote 28 (a
/// Patient and its AuditEvent); an update reads 1.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ValueRecord {
    lists: Vec<([u8; 4], Vec<u8>)>,
}

impl ValueRecord {
    /// The record of these (parameter code, encoded value list) pairs; empty lists are left out.
    pub fn of<'a>(lists: impl IntoIterator<Item = (&'a str, Vec<u8>)>) -> ValueRecord {
        let mut lists: Vec<([u8; 4], Vec<u8>)> = lists
            .into_iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(code, list)| (code_hash(code), list))
            .collect();
        lists.sort_unstable_by_key(|(code, _)| *code);
        ValueRecord { lists }
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// The encoded value list of one parameter (empty when the resource has none).
    pub fn get(&self, code: &str) -> &[u8] {
        let h = code_hash(code);
        self.lists
            .binary_search_by(|(c, _)| c.cmp(&h))
            .map_or(&[][..], |i| &self.lists[i].1)
    }

    /// Each parameter's index-key prefix (for `rtype`) and its values, decoded.
    pub fn lists(
        &self,
        rtype: ResourceType,
    ) -> impl Iterator<Item = ([u8; PARAM_PREFIX_LEN], Vec<IndexValue>)> + '_ {
        let t = type_byte(rtype);
        self.lists.iter().map(move |(c, list)| {
            let mut prefix = [t, 0, 0, 0, 0];
            prefix[1..].copy_from_slice(c);
            (prefix, decode_values(list).unwrap_or_default())
        })
    }

    fn presence(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(2 + 4 * self.lists.len());
        h.extend_from_slice(&(self.lists.len() as u16).to_be_bytes());
        for (c, _) in &self.lists {
            h.extend_from_slice(c);
        }
        h
    }

    /// The two entries to store under `keys` (the resource's `values_keys`): presence, then
    /// the sealed lists.
    pub fn seal(&self, blinding: &BlindingKey, keys: &[Vec<u8>; 2]) -> [Vec<u8>; 2] {
        let presence = self.presence();
        let mut plain = presence.clone();
        plain.reserve(self.lists.iter().map(|(_, l)| 4 + l.len()).sum());
        for (_, list) in &self.lists {
            plain.extend_from_slice(&(list.len() as u32).to_be_bytes());
            plain.extend_from_slice(list);
        }
        let sealed = blinding.seal_values(&keys[1], &plain);
        [presence, sealed]
    }

    /// The record whose lists entry is stored under `key`; an error when it was altered or
    /// moved.
    pub fn open(blinding: &BlindingKey, key: &[u8], sealed: &[u8]) -> Result<ValueRecord> {
        let damaged = || Error::Integrity("a stored index value record is damaged".into());
        let plain = blinding.open_values(key, sealed)?;
        let codes = record_codes(&plain).ok_or_else(damaged)?;
        let mut rest = &plain[2 + 4 * codes.len()..];
        let mut lists = Vec::with_capacity(codes.len());
        for c in codes {
            let len = rest
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(damaged)?;
            let list = rest.get(4..4 + len).ok_or_else(damaged)?;
            lists.push((c.try_into().expect("4 bytes"), list.to_vec()));
            rest = &rest[4 + len..];
        }
        if !rest.is_empty() {
            return Err(damaged());
        }
        Ok(ValueRecord { lists })
    }

    /// Does a presence entry name this parameter?
    pub fn names(presence: &[u8], code_bytes: &[u8]) -> bool {
        record_codes(presence).is_some_and(|mut codes| codes.any(|c| c == code_bytes))
    }
}

/// The code bytes a presence entry names, or None when it is too short to hold them.
fn record_codes(stored: &[u8]) -> Option<std::slice::Chunks<'_, u8>> {
    let n = u16::from_be_bytes(stored.get(..2)?.try_into().ok()?) as usize;
    Some(stored.get(2..2 + 4 * n)?.chunks(4))
}

/// Resource ids as index and value keys end in them, decoded from the end of the key:
/// - a UUID in the lowercase hyphenated form the server assigns: its 16 bytes, then `UUID_ID`;
/// - any other id (a client's, in an update-as-create): its text, its length (u16), `TEXT_ID`.
///
/// Among UUIDs the byte order is their text's order. The bytes may be anything (0, 0xff), so
/// keys are never split at `SEP` from the end: `id_of_key` and `payload_end` read the form.
pub struct IdBytes;

const UUID_ID: u8 = 1;
const TEXT_ID: u8 = 2;

impl IdBytes {
    /// Append `id` in its key form.
    pub fn push(key: &mut Vec<u8>, id: &str) {
        match uuid_bytes(id) {
            Some(b) => {
                key.extend_from_slice(&b);
                key.push(UUID_ID);
            }
            None => {
                key.extend_from_slice(id.as_bytes());
                let len = u16::try_from(id.len()).unwrap_or(u16::MAX);
                key.extend_from_slice(&len.to_be_bytes());
                key.push(TEXT_ID);
            }
        }
    }

    /// The id at the end of `key` and where its key form starts; None when the key does not
    /// end in one.
    pub fn at_end(key: &[u8]) -> Option<(usize, std::borrow::Cow<'_, str>)> {
        let (&kind, rest) = key.split_last()?;
        match kind {
            UUID_ID => {
                let start = rest.len().checked_sub(16)?;
                let u = uuid::Uuid::from_slice(&rest[start..]).ok()?;
                Some((start, u.hyphenated().to_string().into()))
            }
            TEXT_ID => {
                let len_at = rest.len().checked_sub(2)?;
                let len = u16::from_be_bytes([rest[len_at], rest[len_at + 1]]) as usize;
                let start = len_at.checked_sub(len)?;
                let id = std::str::from_utf8(&rest[start..len_at]).ok()?;
                Some((start, id.into()))
            }
            _ => None,
        }
    }
}

/// The 16 bytes of a UUID written exactly as `Uuid::hyphenated` writes it (lowercase, with
/// hyphens), so decoding gives back the same text; None for any other id.
fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    if id.len() != 36 {
        return None;
    }
    let u = uuid::Uuid::try_parse(id).ok()?;
    let mut text = [0u8; 36];
    (u.hyphenated().encode_lower(&mut text) == id).then(|| *u.as_bytes())
}

/// Order-preserving encoding of an i64.
pub fn ord_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn from_ord_i64(b: &[u8]) -> i64 {
    (u64::from_be_bytes(b[..8].try_into().expect("8 bytes")) ^ (1 << 63)) as i64
}

/// A reference as the index stores it: relative `Type/id` when it points into this server.
pub fn local_reference(target: &str, base: &str) -> String {
    target
        .strip_prefix(base)
        .map(|r| r.trim_start_matches('/').to_string())
        .unwrap_or_else(|| target.to_string())
}

fn text_key(prefix: &[u8], tag: u8, parts: &[&str], id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(
        prefix.len() + 2 + id.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>(),
    );
    k.extend_from_slice(prefix);
    k.push(tag);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(FIELD);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k.push(SEP);
    IdBytes::push(&mut k, id);
    k
}

fn ending_in(mut key: Vec<u8>, id: &str) -> (Vec<u8>, Vec<u8>) {
    key.push(SEP);
    IdBytes::push(&mut key, id);
    (key, vec![])
}

/// Every index entry (key, value) for the values of one parameter of one resource.
pub fn index_entries(
    blinding: &BlindingKey,
    prefix: &[u8],
    id: &str,
    values: &[IndexValue],
    base: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for v in values {
        match v {
            IndexValue::Str(s) => out.extend(
                blinding
                    .prefix_term_keys(prefix, b'S', &normalize(s))
                    .into_iter()
                    .map(|k| ending_in(k, id)),
            ),
            IndexValue::Token {
                system,
                code,
                text,
                personal,
            } => {
                if let Some(c) = code {
                    out.push(if *personal {
                        ending_in(blinding.term_key(prefix, b'P', c), id)
                    } else {
                        (
                            text_key(prefix, b'T', &[c, system.as_deref().unwrap_or("")], id),
                            vec![],
                        )
                    });
                }
                if let Some(s) = system {
                    out.push((text_key(prefix, b'Y', &[s], id), vec![]));
                }
                if let Some(t) = text {
                    out.push((text_key(prefix, b'X', &[&normalize(t)], id), vec![]));
                }
            }
            IndexValue::Reference { target, identifier } => {
                if let Some(t) = target {
                    let local = local_reference(t, base);
                    if let Some((_, target_id)) =
                        local.split_once('/').filter(|(ty, _)| !ty.contains(':'))
                    {
                        out.push((text_key(prefix, b'D', &[target_id], id), vec![]));
                    }
                    out.push((text_key(prefix, b'R', &[&local], id), vec![]));
                }
                if let Some((_, value)) = identifier {
                    out.push(ending_in(blinding.term_key(prefix, b'I', value), id));
                }
            }
            IndexValue::Uri(u) => out.push((text_key(prefix, b'U', &[u], id), vec![])),
            IndexValue::Date { lo, hi } => {
                let mut l = prefix.to_vec();
                l.push(b'L');
                l.extend_from_slice(&ord_i64(*lo));
                IdBytes::push(&mut l, id);
                out.push((l, ord_i64(*hi).to_vec()));
                let mut h = prefix.to_vec();
                h.push(b'H');
                h.extend_from_slice(&ord_i64(*hi));
                IdBytes::push(&mut h, id);
                out.push((h, ord_i64(*lo).to_vec()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The resource id at the end of an index key that starts with `prefix` + tag.
pub fn id_of_key(prefix_len: usize, key: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let (start, id) = IdBytes::at_end(key)?;
    let tag = *key.get(prefix_len)?;
    let payload = match tag {
        b'L' | b'H' => 8,
        _ => 1, // at least the SEP before the id
    };
    (start >= prefix_len + 1 + payload).then_some(id)
}

/// Where the text of a text index key ends (its SEP before the id).
pub fn payload_end(key: &[u8]) -> Option<usize> {
    let (start, _) = IdBytes::at_end(key)?;
    start.checked_sub(1).filter(|sep| key[*sep] == SEP)
}

/// Scan bounds [start, end) of the date entries under `prefix` + `tag` ('L' or 'H') whose
/// ordering date lies in [from, to].
pub fn date_bounds(prefix: &[u8], tag: u8, from: i64, to: i64) -> (Vec<u8>, Vec<u8>) {
    let mut start = prefix.to_vec();
    start.push(tag);
    start.extend_from_slice(&ord_i64(from));
    let mut end = prefix.to_vec();
    match to.checked_add(1) {
        Some(after) => {
            end.push(tag);
            end.extend_from_slice(&ord_i64(after));
        }
        None => end.push(tag + 1),
    }
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_out_of_every_kind_of_key_and_no_personal_text_is_in_one() {
        let blinding = BlindingKey::derive(&[3; 32]);
        let prefix = param_prefix(ResourceType::Patient, "x");
        let values = vec![
            IndexValue::Str("Éva".into()),
            IndexValue::Token {
                system: Some("s".into()),
                code: Some("c".into()),
                text: Some("Tx".into()),
                personal: false,
            },
            IndexValue::Token {
                system: Some("urn:mrn".into()),
                code: Some("MRN-4711".into()),
                text: None,
                personal: true,
            },
            IndexValue::Reference {
                target: Some("http://base/fhir/Patient/9".into()),
                identifier: Some((None, "SSN-555".into())),
            },
            IndexValue::Uri("http://u".into()),
            IndexValue::Date {
                lo: -5,
                hi: 0x0000_0100_0000_0000,
            },
        ];
        // Server-assigned UUIDs (their bytes may be 0 or 0xff, like SEP and a scan's end) and
        // a client's id.
        for id in [
            "ff00ff00-0000-4000-8000-0000000000ff",
            "00000000-0000-0000-0000-000000000000",
            "pat-1",
        ] {
            let entries = index_entries(&blinding, &prefix, id, &values, "http://base/fhir");
            assert_eq!(entries.len(), 12);
            for (k, _) in &entries {
                assert_eq!(id_of_key(prefix.len(), k).as_deref(), Some(id), "{k:?}");
                if k[prefix.len()] == b'U' {
                    assert_eq!(&k[prefix.len() + 1..payload_end(k).unwrap()], b"http://u");
                }
            }
        }
        let entries = index_entries(&blinding, &prefix, "pat-1", &values, "http://base/fhir");
        // S: 1 prefix; T, Y, X; P, Y; R, D, I; U; L, H.
        assert_eq!(entries.len(), 12);
        assert_eq!(prefix.len(), PARAM_PREFIX_LEN);
        for (k, _) in &entries {
            assert_eq!(
                id_of_key(prefix.len(), k).as_deref(),
                Some("pat-1"),
                "{k:?}"
            );
            for clear in ["eva", "ev", "MRN", "4711", "SSN"] {
                assert!(
                    !k.windows(clear.len()).any(|w| w == clear.as_bytes()),
                    "{clear} in {k:?}"
                );
            }
        }
        assert!(entries
            .iter()
            .any(|(k, _)| k.ends_with(b"RPatient/9\0pat-1\0\x05\x02")));
        let mut eva = blinding.term_key(&prefix, b'S', "ev");
        eva.extend_from_slice(b"\0pat-1\0\x05\x02");
        assert!(entries.iter().any(|(k, _)| *k == eva));
    }

    #[test]
    fn ids_in_keys_take_16_bytes_for_a_server_uuid_and_keep_their_order() {
        let ids = [
            "0b7c6a3e-8f1d-4c2a-9e5b-3d2f1a0c9b8e",
            "0b7c6a3e-8f1d-4c2a-9e5b-3d2f1a0c9b8f",
            "9fffffff-ffff-4fff-bfff-ffffffffffff",
            "a0000000-0000-4000-8000-000000000000",
            "ffffffff-ffff-4fff-bfff-ffffffffffff",
        ];
        let encoded: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| {
                let mut k = vec![];
                IdBytes::push(&mut k, id);
                assert_eq!(k.len(), 17);
                assert_eq!(
                    IdBytes::at_end(&k).map(|(at, id)| (at, id.into_owned())),
                    Some((0, id.to_string()))
                );
                k
            })
            .collect();
        assert!(
            encoded.windows(2).all(|w| w[0] < w[1]),
            "UUID order is text order"
        );
        // Anything else a FHIR id may be stays text: uppercase or unhyphenated UUIDs too.
        for id in [
            "0B7C6A3E-8F1D-4C2A-9E5B-3D2F1A0C9B8E",
            "0b7c6a3e8f1d4c2a9e5b3d2f1a0c9b8e",
            "example",
            "a.b-C.9",
            &"x".repeat(64),
        ] {
            let mut k = b"prefix".to_vec();
            IdBytes::push(&mut k, id);
            assert_eq!(k.len(), 6 + id.len() + 3);
            assert_eq!(IdBytes::at_end(&k).unwrap().1, id);
        }
        assert!(IdBytes::at_end(b"").is_none());
        assert!(IdBytes::at_end(b"\x01").is_none());
        assert!(IdBytes::at_end(b"ab\xff\x02").is_none());
    }

    #[test]
    fn date_scan_bounds_hold_every_id_of_their_last_day() {
        let prefix = param_prefix(ResourceType::Patient, "birthdate");
        let values = [IndexValue::Date { lo: 10, hi: 20 }];
        let blinding = BlindingKey::derive(&[3; 32]);
        let (start, end) = date_bounds(&prefix, b'L', 0, 10);
        for id in [
            "ffffffff-ffff-4fff-bfff-ffffffffffff",
            "00000000-0000-0000-0000-000000000000",
            "z",
        ] {
            let entries = index_entries(&blinding, &prefix, id, &values, "");
            let l = &entries
                .iter()
                .find(|(k, _)| k[prefix.len()] == b'L')
                .unwrap()
                .0;
            assert!(start <= *l && *l < end, "{id}");
        }
        let (_, end) = date_bounds(&prefix, b'L', 0, 9);
        for (k, _) in index_entries(&blinding, &prefix, "z", &values, "") {
            assert!(k >= end || k[prefix.len()] != b'L');
        }
        let (_, end) = date_bounds(&prefix, b'H', 0, i64::MAX);
        assert_eq!(end.last(), Some(&(b'H' + 1)));
    }

    #[test]
    fn a_value_record_opens_only_under_its_key_and_unaltered() {
        let blinding = BlindingKey::derive(&[5; 32]);
        let record = ValueRecord::of([
            ("family", b"s-chalmers".to_vec()),
            ("gender", b"t-female".to_vec()),
            ("deceased", vec![]),
        ]);
        assert_eq!(record.get("family"), b"s-chalmers");
        assert_eq!(record.get("deceased"), b"", "an empty list is not kept");
        assert_eq!(record.get("birthdate"), b"");
        let keys = values_keys(ResourceType::Patient, "p1");
        let [presence, sealed] = record.seal(&blinding, &keys);
        assert_eq!(
            [presence.clone(), sealed.clone()],
            record.seal(&blinding, &keys),
            "sealing is deterministic"
        );
        let open = |k: &[Vec<u8>; 2], s: &[u8]| ValueRecord::open(&blinding, &k[1], s);
        assert_eq!(open(&keys, &sealed).unwrap(), record);
        assert!(
            !sealed.windows(8).any(|w| w == b"chalmers"),
            "values are sealed"
        );
        // Which parameters it has is read from the presence entry alone.
        assert_eq!(presence.len(), 2 + 2 * 4);
        assert!(ValueRecord::names(&presence, &code_hash("family")));
        assert!(ValueRecord::names(&presence, &code_hash("gender")));
        assert!(!ValueRecord::names(&presence, &code_hash("deceased")));
        assert!(!ValueRecord::names(&presence[..3], &code_hash("family")));
        // Moved to another resource, or any byte changed: refused.
        let other = values_keys(ResourceType::Patient, "p2");
        assert!(open(&other, &sealed).is_err());
        assert!(open(&[keys[1].clone(), keys[0].clone()], &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&keys, &bad).is_err(), "byte {i}");
        }
        assert!(open(&keys, &sealed[..sealed.len() - 1]).is_err());
        assert!(open(&keys, &[]).is_err());
        // Each parameter comes back with the index-key prefix its entries use.
        let prefixes: Vec<_> = record
            .lists(ResourceType::Patient)
            .map(|(p, _)| p.to_vec())
            .collect();
        let mut expected = vec![
            param_prefix(ResourceType::Patient, "family"),
            param_prefix(ResourceType::Patient, "gender"),
        ];
        expected.sort();
        assert_eq!(prefixes, expected);
    }

    #[test]
    fn date_keys_sort_by_time_across_zero() {
        assert!(ord_i64(-1) < ord_i64(0));
        assert!(ord_i64(i64::MIN) < ord_i64(-1));
        assert!(ord_i64(5) < ord_i64(i64::MAX));
        assert_eq!(from_ord_i64(&ord_i64(-42)), -42);
    }
}
