//! Blind indexing: the search index holds no personal text in clear.
//!
//! One random 256-bit **blinding key** per store, kept wrapped under the KEK in the `keys`
//! family (scope `index`, so a KEK rotation re-wraps it with the data keys and nothing has to
//! be re-indexed). Three subkeys are derived from it with HMAC-SHA256:
//!
//! - **terms**: an index key's text part (a name or address prefix, an identifier or telecom
//!   value, a reference's identifier) becomes the first 16 bytes of
//!   HMAC(terms, param prefix ‖ tag ‖ text). Equal text in the same parameter gives equal
//!   terms, so lookups stay one prefix scan; nothing about the text can be read back.
//!   String search is starts-with, so a string value is indexed under the terms of its
//!   normalised prefixes of `PREFIX_LENGTHS` characters: a query looks up its longest indexed
//!   prefix and, when that is shorter than the query, rechecks the candidates' stored values.
//! - **values** and **nonces**: the `values` family (each resource's value lists, used to
//!   recheck and sort; `keys::ValueRecord`) is sealed with AES-256-GCM under `values`, with
//!   the family key as associated data, so a record cannot be moved to another resource. The nonce is HMAC(nonces, family key ‖ plaintext): sealing is deterministic, so
//!   `reindex` rebuilds the family byte for byte, and two plaintexts never share a nonce.

use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Lengths (in characters of the normalised text) of the prefixes a string is indexed under.
/// Each is one more index key per value on every write; a query between two lengths (or
/// past the last) rechecks the candidates of the shorter one, and a one-character query
/// rechecks every value of its parameter.
pub const PREFIX_LENGTHS: [usize; 3] = [2, 4, 8];

/// Bytes of a blinded term.
pub const TERM_LEN: usize = 16;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The blinding key's subkeys.
#[derive(Clone)]
pub struct BlindingKey {
    /// HMAC keyed with the terms subkey, ready to clone (saves hashing the key per term).
    terms: Hmac<Sha256>,
    /// AES-256-GCM under the values subkey, its key schedule expanded once (a one-shot
    /// cipher per value list spent more on setting up the key than on sealing).
    values: LessSafeKey,
    /// HMAC keyed with the nonces subkey, ready to clone.
    nonces: Hmac<Sha256>,
}

impl std::fmt::Debug for BlindingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlindingKey(..)")
    }
}

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length")
}

/// HMAC of `parts` under a keyed state (cloned, so the key is hashed once).
fn mac_of(keyed: &Hmac<Sha256>, parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed.clone();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    mac_of(&keyed(key), parts)
}

/// The longest indexed prefix of a normalised query text: its byte length, and whether it
/// is the whole text (else the candidates it finds must be rechecked).
pub fn probe_prefix(text: &str) -> (usize, bool) {
    let chars = text.chars().count();
    let k = PREFIX_LENGTHS
        .iter()
        .copied()
        .filter(|k| *k <= chars)
        .max()
        .unwrap_or(0);
    (byte_len_of_chars(text, k), k == chars)
}

fn byte_len_of_chars(text: &str, chars: usize) -> usize {
    text.char_indices()
        .nth(chars)
        .map_or(text.len(), |(at, _)| at)
}

impl BlindingKey {
    /// The subkeys of a 256-bit blinding key.
    pub fn derive(key: &[u8; 32]) -> BlindingKey {
        BlindingKey {
            terms: keyed(&hmac(key, &[b"fhirmament/blind-index/terms"])),
            values: LessSafeKey::new(
                UnboundKey::new(
                    &AES_256_GCM,
                    &hmac(key, &[b"fhirmament/blind-index/values"]),
                )
                .expect("a 32-byte AES-256-GCM key"),
            ),
            nonces: keyed(&hmac(key, &[b"fhirmament/blind-index/nonces"])),
        }
    }

    /// `prefix ‖ tag ‖ term(text)`: the start of every index key for this text.
    pub fn term_key(&self, prefix: &[u8], tag: u8, text: &str) -> Vec<u8> {
        let mac = mac_of(&self.terms, &[prefix, &[tag], text.as_bytes()]);
        let mut k = Vec::with_capacity(prefix.len() + 1 + TERM_LEN + 1 + 40);
        k.extend_from_slice(prefix);
        k.push(tag);
        k.extend_from_slice(&mac[..TERM_LEN]);
        k
    }

    /// The term keys a normalised text is indexed under: one per indexed prefix length.
    pub fn prefix_term_keys(&self, prefix: &[u8], tag: u8, text: &str) -> Vec<Vec<u8>> {
        let chars = text.chars().count();
        PREFIX_LENGTHS
            .iter()
            .take_while(|k| **k <= chars)
            .map(|k| self.term_key(prefix, tag, &text[..byte_len_of_chars(text, *k)]))
            .collect()
    }

    /// Seal an encoded value list stored under `key` in the `values` family.
    pub fn seal_values(&self, key: &[u8], plain: &[u8]) -> Vec<u8> {
        let mac = mac_of(
            &self.nonces,
            &[&(key.len() as u32).to_be_bytes(), key, plain],
        );
        let nonce: [u8; NONCE_LEN] = mac[..NONCE_LEN].try_into().expect("12 bytes");
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .values
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key),
                &mut out[NONCE_LEN..],
            )
            .expect("AES-256-GCM seals any value list shorter than 64 GiB");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The encoded value list sealed under `key`; an error when it was altered or moved.
    pub fn open_values(&self, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(Error::Integrity("a stored index value is truncated".into()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
        let mut body = rest.to_vec();
        let plain = self
            .values
            .open_in_place(nonce, Aad::from(key), &mut body)
            .map_err(|_| Error::Integrity("a stored index value does not decrypt".into()))?
            .len();
        body.truncate(plain);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> BlindingKey {
        BlindingKey::derive(&[b; 32])
    }

    #[test]
    fn terms_are_keyed_and_separate_parameters_and_tags() {
        let k = key(1);
        let a = k.term_key(b"PARAM", b'S', "smith");
        assert_eq!(a, k.term_key(b"PARAM", b'S', "smith"));
        assert_eq!(a.len(), 5 + 1 + TERM_LEN);
        assert!(!a.windows(5).any(|w| w == b"smith"));
        assert_ne!(a, k.term_key(b"OTHER", b'S', "smith"));
        assert_ne!(a, k.term_key(b"PARAM", b'X', "smith"));
        assert_ne!(a, key(2).term_key(b"PARAM", b'S', "smith"));
    }

    #[test]
    fn a_query_finds_its_value_through_the_longest_indexed_prefix() {
        let k = key(1);
        let indexed = k.prefix_term_keys(b"P", b'S', "émilienne");
        assert_eq!(indexed.len(), 3, "prefixes of 2, 4 and 8 characters");
        for query in [
            "ém",
            "émi",
            "émil",
            "émili",
            "émilie",
            "émilienn",
            "émilienne",
        ] {
            let (len, whole) = probe_prefix(query);
            assert_eq!(whole, [2, 4, 8].contains(&query.chars().count()), "{query}");
            assert!(
                indexed.contains(&k.term_key(b"P", b'S', &query[..len])),
                "{query}"
            );
        }
        // Shorter than every indexed prefix: no term, every value is a candidate.
        assert_eq!(probe_prefix("é"), (0, false));
        assert_eq!(probe_prefix(""), (0, true));
    }

    #[test]
    fn sealed_values_are_deterministic_bound_to_their_key_and_tamper_evident() {
        let k = key(7);
        let sealed = k.seal_values(b"key-1", b"Chalmers");
        assert_eq!(sealed, k.seal_values(b"key-1", b"Chalmers"));
        assert_ne!(sealed, k.seal_values(b"key-1", b"Chalmerz"));
        assert!(!sealed.windows(8).any(|w| w == b"Chalmers"));
        assert_eq!(k.open_values(b"key-1", &sealed).unwrap(), b"Chalmers");
        assert!(k.open_values(b"key-2", &sealed).is_err(), "moved");
        assert!(key(8).open_values(b"key-1", &sealed).is_err(), "other key");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(k.open_values(b"key-1", &bad).is_err(), "byte {i}");
        }
        assert!(k.open_values(b"key-1", &sealed[..10]).is_err());
    }

    #[test]
    fn sealed_values_keep_the_layout_stores_already_hold() {
        // nonce(12) ‖ AES-256-GCM ciphertext ‖ tag(16), as sealed by the OpenSSL one-shot
        // cipher this replaced: existing `values` families open and re-seal byte for byte.
        let k = key(7);
        let known = "8d8198e951a34c152d2b54163475a67b164efb2550bc352f3572f2932e93a18375d32028";
        let hex: String = k
            .seal_values(b"key-1", b"Chalmers")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, known);
    }
}
