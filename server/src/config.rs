//! Configuration: command-line flags override `FHIRMAMENT_*` environment variables, which
//! override the TOML file named by `--config`, which overrides the embedded defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The FHIR base URL clients see, e.g. `http://127.0.0.1:8080/fhir`.
    pub base_url: String,
    pub max_body_bytes: usize,
    /// Load profiles from this directory instead of the embedded copy.
    pub profiles_dir: Option<PathBuf>,
    pub workers: usize,
    /// Consortium genesis (none: a consortium of one, generated under the data directory).
    pub genesis: Option<PathBuf>,
    pub replica_id: Option<u32>,
    pub ledger_key: Option<PathBuf>,
    pub peer_listen: Option<String>,
    /// Enables RFC 7591 dynamic client registration for holders of this initial access token.
    pub registration_token: Option<String>,
    /// Consent: base policy, break-the-glass, and this node's organization.
    pub consent: crate::consent::gate::ConsentSettings,
    /// How long a write (or an AuditEvent) waits for the ledger before it fails.
    pub commit_timeout: std::time::Duration,
    /// The key-encryption key's JWK file (`None`: `FHIRMAMENT_KEK`, else `<data-dir>.kek`).
    pub kek_file: Option<PathBuf>,
    /// The key-encryption key's JWK, given inline (environment only).
    pub kek_inline: Option<String>,
    /// The KEK being rotated away from (its data keys are re-wrapped at start).
    pub previous_kek_file: Option<PathBuf>,
    /// Where sealed versions live: `None` (embedded RocksDB) or `s3://bucket[/prefix]`.
    pub object_store: Option<String>,
    /// An external OpenID Connect issuer whose access tokens are accepted too.
    pub oidc_issuer: Option<String>,
    /// The claim of its tokens that names the user as a FHIR reference.
    pub oidc_fhir_user_claim: String,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./data";
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What the TOML file may set. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub base_url: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub profiles_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub genesis: Option<PathBuf>,
    pub replica_id: Option<u32>,
    pub ledger_key: Option<PathBuf>,
    pub peer_listen: Option<String>,
    pub registration_token: Option<String>,
    pub consent_base: Option<crate::consent::BasePolicy>,
    pub break_glass: Option<bool>,
    pub organization: Option<String>,
    pub commit_timeout_secs: Option<u64>,
    pub kek_file: Option<PathBuf>,
    pub previous_kek_file: Option<PathBuf>,
    pub object_store: Option<String>,
    pub oidc_issuer: Option<String>,
    pub oidc_fhir_user_claim: Option<String>,
}

/// What the command line and environment may set (clap fills these).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (keys: listen, data-dir, base-url, max-body-bytes, profiles-dir, workers, genesis, replica-id, ledger-key, peer-listen, registration-token).
    #[arg(long, env = "FHIRMAMENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "FHIRMAMENT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// RocksDB data directory [default: ./data].
    #[arg(long = "data-dir", env = "FHIRMAMENT_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Public FHIR base URL used in Location headers, fullUrls and links [default: http://<listen>/fhir].
    #[arg(long = "base-url", env = "FHIRMAMENT_BASE_URL")]
    pub base_url: Option<String>,
    /// Largest accepted request body in bytes; larger bodies get 413 [default: 16 MiB].
    #[arg(long = "max-body-bytes", env = "FHIRMAMENT_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Load the R4 schema, StructureDefinitions and SearchParameters from this directory instead of the embedded copy.
    #[arg(long = "profiles-dir", env = "FHIRMAMENT_PROFILES_DIR")]
    pub profiles_dir: Option<PathBuf>,
    /// HTTP worker threads [default: number of cores].
    #[arg(long, env = "FHIRMAMENT_WORKERS")]
    pub workers: Option<usize>,
    /// Consortium genesis file (chain id, replica keys and peer addresses) [default: a consortium of one, created under <data-dir>/ledger].
    #[arg(long, env = "FHIRMAMENT_GENESIS")]
    pub genesis: Option<PathBuf>,
    /// This node's replica id in the genesis (required with --genesis).
    #[arg(long = "replica-id", env = "FHIRMAMENT_REPLICA_ID")]
    pub replica_id: Option<u32>,
    /// This replica's Ed25519 secret key file (required with --genesis).
    #[arg(long = "ledger-key", env = "FHIRMAMENT_LEDGER_KEY")]
    pub ledger_key: Option<PathBuf>,
    /// Accept ledger peer connections here instead of at this replica's genesis address (e.g. 0.0.0.0:7000 in a container).
    #[arg(long = "peer-listen", env = "FHIRMAMENT_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Initial access token that enables RFC 7591 dynamic client registration at <base>/auth/register [default: registration disabled].
    #[arg(
        long = "registration-token",
        env = "FHIRMAMENT_REGISTRATION_TOKEN",
        hide_env_values = true
    )]
    pub registration_token: Option<String>,
    /// What holds where no Consent provision applies [default: opt-out].
    #[arg(long = "consent-base", env = "FHIRMAMENT_CONSENT_BASE", value_enum)]
    pub consent_base: Option<crate::consent::BasePolicy>,
    /// Let practitioners override a consent deny with purpose of use ETREAT (audited, flagged for review).
    #[arg(long = "break-glass", env = "FHIRMAMENT_BREAK_GLASS")]
    pub break_glass: Option<bool>,
    /// This node's organization as Consents name it: Organization/<id> [default: Organization/replica-<replica id>].
    #[arg(long, env = "FHIRMAMENT_ORGANIZATION")]
    pub organization: Option<String>,
    /// Seconds a write, or an interaction's AuditEvent, waits for the ledger before it fails [default: 30].
    #[arg(long = "commit-timeout-secs", env = "FHIRMAMENT_COMMIT_TIMEOUT_SECS")]
    pub commit_timeout_secs: Option<u64>,
    /// The key-encryption key (a JWK file, kept apart from the data directory) [default: FHIRMAMENT_KEK, else <data-dir>.kek, created with a new store].
    #[arg(long = "kek-file", env = "FHIRMAMENT_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Rotate from this key-encryption key: start with the new --kek-file and this one; every data key is re-wrapped under the new KEK, after which this one can be retired.
    #[arg(long = "previous-kek-file", env = "FHIRMAMENT_PREVIOUS_KEK_FILE")]
    pub previous_kek_file: Option<PathBuf>,
    /// Where sealed versions live: `rocksdb` (embedded, in the data directory) or `s3://bucket[/prefix]` on an S3-compatible store, with endpoint and credentials from AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ALLOW_HTTP [default: rocksdb].
    #[arg(long = "object-store", env = "FHIRMAMENT_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// Also accept access tokens from this OpenID Connect issuer (discovered at start; JWT access tokens with aud = the FHIR base).
    #[arg(long = "oidc-issuer", env = "FHIRMAMENT_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// The claim of the external issuer's tokens naming the user as a FHIR reference [default: fhirUser].
    #[arg(long = "oidc-fhir-user-claim", env = "FHIRMAMENT_OIDC_FHIR_USER_CLAIM")]
    pub oidc_fhir_user_claim: Option<String>,
    /// The key-encryption key's JWK itself (e.g. from a secret).
    #[arg(
        long = "kek",
        env = "FHIRMAMENT_KEK",
        hide_env_values = true,
        hide = true
    )]
    pub kek: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("config file {0} is invalid: {1}")]
    Parse(String, toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn resolve(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default address"));
        let base_url = args
            .base_url
            .clone()
            .or(file.base_url)
            .unwrap_or_else(|| format!("http://{listen}/fhir"));
        let base_url = base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "base-url '{base_url}' must be an http(s) URL"
            )));
        }
        let max_body_bytes = args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max-body-bytes must be at least 1024".into(),
            ));
        }
        Ok(Config {
            listen,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            base_url,
            max_body_bytes,
            profiles_dir: args.profiles_dir.clone().or(file.profiles_dir),
            workers: args
                .workers
                .or(file.workers)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
                .max(1),
            genesis: args.genesis.clone().or(file.genesis),
            replica_id: args.replica_id.or(file.replica_id),
            ledger_key: args.ledger_key.clone().or(file.ledger_key),
            peer_listen: args.peer_listen.clone().or(file.peer_listen),
            registration_token: args.registration_token.clone().or(file.registration_token),
            consent: crate::consent::gate::ConsentSettings {
                base: args
                    .consent_base
                    .or(file.consent_base)
                    .unwrap_or(crate::consent::BasePolicy::OptOut),
                break_glass: args.break_glass.or(file.break_glass).unwrap_or(false),
                organization: {
                    let org = args
                        .organization
                        .clone()
                        .or(file.organization)
                        .unwrap_or_else(|| {
                            format!(
                                "Organization/replica-{}",
                                args.replica_id.or(file.replica_id).unwrap_or(0)
                            )
                        });
                    if !org.starts_with("Organization/") || org.len() <= "Organization/".len() {
                        return Err(ConfigError::Invalid(format!(
                            "organization '{org}' must be Organization/<id>"
                        )));
                    }
                    org
                },
            },
            kek_file: args.kek_file.clone().or(file.kek_file),
            kek_inline: args.kek.clone(),
            previous_kek_file: args.previous_kek_file.clone().or(file.previous_kek_file),
            oidc_issuer: args
                .oidc_issuer
                .clone()
                .or(file.oidc_issuer)
                .filter(|i| !i.is_empty()),
            oidc_fhir_user_claim: args
                .oidc_fhir_user_claim
                .clone()
                .or(file.oidc_fhir_user_claim)
                .unwrap_or_else(|| "fhirUser".into()),
            object_store: args
                .object_store
                .clone()
                .or(file.object_store)
                .filter(|u| u != "rocksdb"),
            commit_timeout: std::time::Duration::from_secs(
                args.commit_timeout_secs
                    .or(file.commit_timeout_secs)
                    .unwrap_or(30)
                    .max(1),
            ),
        })
    }

    fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(shown.clone(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(shown, e))
    }

    /// The key-encryption key: from `--kek-file`, from `FHIRMAMENT_KEK`, or from `<data-dir>.kek`
    /// beside (never inside) the data directory — created there for a new store only.
    pub fn kek(&self) -> Result<crate::store::envelope::Kek, ConfigError> {
        use crate::store::envelope::Kek;
        let from_file = |path: &Path| -> Result<Kek, ConfigError> {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "cannot read the key-encryption key {}: {e}",
                    path.display()
                ))
            })?;
            Kek::from_jwk(&text).map_err(|e| {
                ConfigError::Invalid(format!("key-encryption key {}: {e}", path.display()))
            })
        };
        if let Some(path) = &self.kek_file {
            return from_file(path);
        }
        if let Some(text) = &self.kek_inline {
            return Kek::from_jwk(text)
                .map_err(|e| ConfigError::Invalid(format!("FHIRMAMENT_KEK: {e}")));
        }
        let path = self.default_kek_path();
        if path.exists() {
            return from_file(&path);
        }
        if self.data_dir.join("CURRENT").exists() {
            return Err(ConfigError::Invalid(format!(
                "no key-encryption key: {} holds a store, but {} does not exist; give --kek-file",
                self.data_dir.display(),
                path.display()
            )));
        }
        let (kek, text) = Kek::generate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::write(&path, text)
            .map_err(|e| ConfigError::Invalid(format!("cannot write {}: {e}", path.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        tracing::info!(path = %path.display(), "created a new key-encryption key for a new store; keep it (and its backups) apart from the data directory's");
        Ok(kek)
    }

    /// The KEK being rotated away from, if one is configured.
    pub fn previous_kek(&self) -> Result<Option<crate::store::envelope::Kek>, ConfigError> {
        self.previous_kek_file
            .as_ref()
            .map(|path| {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!("cannot read {}: {e}", path.display()))
                })?;
                crate::store::envelope::Kek::from_jwk(&text).map_err(|e| {
                    ConfigError::Invalid(format!("previous KEK {}: {e}", path.display()))
                })
            })
            .transpose()
    }

    /// `<data-dir>.kek`: beside the data directory, not in it.
    pub fn default_kek_path(&self) -> PathBuf {
        let mut name = self
            .data_dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "data".into());
        name.push(".kek");
        self.data_dir
            .parent()
            .map(|p| p.join(&name))
            .unwrap_or_else(|| PathBuf::from(&name))
    }

    /// The path part of the base URL (`/fhir`), where the API is mounted.
    pub fn base_path(&self) -> String {
        let after_scheme = self
            .base_url
            .split_once("://")
            .map_or(self.base_url.as_str(), |(_, r)| r);
        match after_scheme.find('/') {
            Some(i) => after_scheme[i..].trim_end_matches('/').to_string(),
            None => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.base_url, "http://127.0.0.1:8080/fhir");
        assert_eq!(c.base_path(), "/fhir");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\ndata-dir = \"/var/x\"\nmax-body-bytes = 2048\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            data_dir: Some("/flag".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.data_dir, PathBuf::from("/flag"));
        assert_eq!(c.max_body_bytes, 2048);
        assert_eq!(c.base_url, "http://127.0.0.1:9000/fhir");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        assert!(Config::resolve(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .is_err());
        assert!(Config::resolve(&ServeArgs {
            base_url: Some("ftp://x".into()),
            ..Default::default()
        })
        .is_err());
    }
}
