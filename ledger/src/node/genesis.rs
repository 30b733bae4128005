//! Membership from a genesis file: the chain id and, per replica, its id, Ed25519 public key
//! and peer address. Keys are generated here; secret keys live in their own files.

use std::net::SocketAddr;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::core::Membership;

#[derive(Debug, thiserror::Error)]
pub enum GenesisError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GenesisReplica {
    pub id: u32,
    /// Hex-encoded Ed25519 public key.
    pub public_key: String,
    /// `host:port` where peers reach this replica (a name is resolved at each connection).
    pub address: String,
    /// Where the application embedding this replica answers its peers (opaque to the
    /// ledger; Fhirmament puts the organization's FHIR base URL here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    pub chain_id: String,
    pub replicas: Vec<GenesisReplica>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A new secret key from the operating system's randomness.
pub fn generate_key() -> Result<SigningKey, std::io::Error> {
    let mut seed = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn write_key(path: &Path, key: &SigningKey) -> Result<(), GenesisError> {
    let io = |source| GenesisError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(path, hex(&key.to_bytes()) + "\n").map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

pub fn read_key(path: &Path) -> Result<SigningKey, GenesisError> {
    let text = std::fs::read_to_string(path).map_err(|source| GenesisError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let bytes: [u8; 32] = unhex(text.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| GenesisError::Invalid {
            path: path.display().to_string(),
            message: "not a hex Ed25519 secret key".into(),
        })?;
    Ok(SigningKey::from_bytes(&bytes))
}

pub fn public_key_hex(key: &SigningKey) -> String {
    hex(key.verifying_key().as_bytes())
}

impl Genesis {
    pub fn load(path: &Path) -> Result<Genesis, GenesisError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| GenesisError::Io {
            path: shown.clone(),
            source,
        })?;
        let g: Genesis = serde_json::from_str(&text).map_err(|e| GenesisError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        g.membership().map_err(|message| GenesisError::Invalid {
            path: shown,
            message,
        })?;
        Ok(g)
    }

    pub fn save(&self, path: &Path) -> Result<(), GenesisError> {
        let text = serde_json::to_string_pretty(self).expect("genesis serialises");
        std::fs::write(path, text + "\n").map_err(|source| GenesisError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// The membership, checking that ids are 0..n in order and keys are valid.
    pub fn membership(&self) -> Result<Membership, String> {
        if self.replicas.is_empty() {
            return Err("a genesis needs at least one replica".into());
        }
        let mut keys = Vec::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if r.id as usize != i {
                return Err(format!(
                    "replica ids must be 0..n in order; found {} at position {i}",
                    r.id
                ));
            }
            if r.address
                .rsplit_once(':')
                .and_then(|(host, port)| (!host.is_empty()).then_some(port))
                .and_then(|p| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(format!(
                    "replica {i}: address '{}' is not host:port",
                    r.address
                ));
            }
            let bytes: [u8; 32] = unhex(&r.public_key)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("replica {i}: public_key is not 32 hex bytes"))?;
            keys.push(VerifyingKey::from_bytes(&bytes).map_err(|e| format!("replica {i}: {e}"))?);
        }
        Ok(Membership::new(self.chain_id.clone(), keys))
    }

    /// Keys and a genesis for `n` replicas on loopback ports from `base_port`; the secret keys
    /// are written to `dir/replica-<i>.key`.
    pub fn generate(
        chain_id: &str,
        n: usize,
        base_port: u16,
        dir: &Path,
    ) -> Result<Genesis, GenesisError> {
        std::fs::create_dir_all(dir).map_err(|source| GenesisError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut replicas = Vec::new();
        for i in 0..n {
            let key = generate_key().map_err(|source| GenesisError::Io {
                path: "/dev/urandom".into(),
                source,
            })?;
            write_key(&dir.join(format!("replica-{i}.key")), &key)?;
            replicas.push(GenesisReplica {
                id: i as u32,
                public_key: public_key_hex(&key),
                address: SocketAddr::from(([127, 0, 0, 1], base_port + i as u16)).to_string(),
                api: None,
            });
        }
        let g = Genesis {
            chain_id: chain_id.to_string(),
            replicas,
        };
        g.save(&dir.join("genesis.json"))?;
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_genesis_loads_and_matches_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let g = Genesis::generate("test-chain", 4, 7100, dir.path()).unwrap();
        let loaded = Genesis::load(&dir.path().join("genesis.json")).unwrap();
        assert_eq!(g, loaded);
        let m = loaded.membership().unwrap();
        for i in 0..4 {
            let key = read_key(&dir.path().join(format!("replica-{i}.key"))).unwrap();
            assert_eq!(m.keys[i], key.verifying_key());
        }
    }

    #[test]
    fn bad_genesis_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.json");
        std::fs::write(
            &p,
            r#"{"chain_id":"x","replicas":[{"id":1,"public_key":"00","address":"127.0.0.1:1"}]}"#,
        )
        .unwrap();
        let e = Genesis::load(&p).unwrap_err().to_string();
        assert!(e.contains("ids must be 0..n"), "{e}");
        std::fs::write(
            &p,
            r#"{"chain_id":"x","replicas":[{"id":0,"public_key":"zz","address":"127.0.0.1:1"}]}"#,
        )
        .unwrap();
        assert!(Genesis::load(&p)
            .unwrap_err()
            .to_string()
            .contains("not 32 hex bytes"));
        std::fs::write(&p, r#"{"chain_id":"x","replicas":[],"extra":1}"#).unwrap();
        assert!(Genesis::load(&p).is_err());
    }
}
