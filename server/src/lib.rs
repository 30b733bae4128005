//! Fhirmament: a FHIR R4 server. See ARCHITECTURE.md for the map.

pub mod audit;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod consent;
pub mod error;
pub mod fhir;
pub mod health;
pub mod http;
pub mod ledger;
pub mod profiles;
pub mod search;
pub mod store;
pub mod validate;

use std::sync::Arc;

use actix_web::{middleware, web, App, HttpServer};

use config::Config;
use error::{Error, Result};
use profiles::Profiles;
use search::Registry;
use store::txlog::{LedgerTxLog, TxLog};
use store::Store;
use validate::Validator;

/// Everything a request needs, shared by all workers.
pub struct Service {
    pub config: Config,
    pub profiles: Arc<Profiles>,
    pub registry: Arc<Registry>,
    pub validator: Arc<Validator>,
    pub store: Arc<Store>,
    pub txlog: Arc<dyn TxLog>,
    /// Which replica of which consortium this node is.
    pub replica: Arc<ledger::replica::ReplicaSetup>,
    /// HTTP client for retrieval from other organizations' nodes.
    pub peers: reqwest::Client,
    pub health: Arc<health::Health>,
    /// The SMART authorization server (and the verifier of its tokens).
    pub auth: Arc<auth::AuthServer>,
}

pub fn load_profiles(config: &Config) -> Result<Profiles> {
    match &config.profiles_dir {
        Some(dir) => Profiles::load(dir),
        None => Profiles::embedded(),
    }
    .map_err(|e| Error::Internal(e.to_string()))
}

impl Service {
    pub fn open(config: Config) -> Result<Service> {
        let profiles = Arc::new(load_profiles(&config)?);
        let registry = Arc::new(Registry::from_profiles(&profiles));
        let validator = Arc::new(Validator::new(profiles.clone()));
        let warm = validator.clone();
        std::thread::spawn(move || warm.warm());
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| Error::Storage(format!("creating {}: {e}", config.data_dir.display())))?;
        let kek = config.kek().map_err(|e| Error::Startup(e.to_string()))?;
        let previous = config
            .previous_kek()
            .map_err(|e| Error::Startup(e.to_string()))?;
        let mut store = Store::open_rotating(&config.data_dir, kek, previous)?;
        store.set_objects(store::objects::Objects::open(
            config.object_store.as_deref(),
        )?);
        let store = Arc::new(store);
        if store.index_is_stale()? {
            let n = store::txlog::reindex(&store, &registry, &config.base_url)?;
            tracing::info!(resources = n, "search index rebuilt with blinded terms");
        }
        let replica = ledger::replica::ReplicaSetup::resolve(&config)?;
        let mut auth = auth::AuthServer::open(&config.data_dir.join("auth"), &config.base_url)?
            .with_registration_token(config.registration_token.clone());
        if let Some(issuer) = &config.oidc_issuer {
            let (issuer, keys) =
                auth::oidc::ExternalIssuer::discover(issuer, &config.oidc_fhir_user_claim)?;
            tracing::info!(issuer = %issuer.issuer, "accepting access tokens of an external OpenID Connect issuer");
            auth = auth.with_external_issuer(issuer, keys);
        }
        let auth = Arc::new(auth);
        let log = LedgerTxLog::start(
            store.clone(),
            registry.clone(),
            config.base_url.clone(),
            &replica,
            config.commit_timeout,
        )?;
        let health = log.health.clone();
        let txlog: Arc<dyn TxLog> = Arc::new(log);
        Ok(Service {
            config,
            profiles,
            registry,
            validator,
            store,
            txlog,
            replica: Arc::new(replica),
            peers: reqwest::Client::new(),
            health,
            auth,
        })
    }
}

/// SIGHUP: read the key-encryption key again (from `--kek-file`, or `<data-dir>.kek`); when an
/// operator has put a new one there, re-wrap every data key under it while serving.
fn rotate_kek_on_hangup(svc: Arc<Service>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: online KEK rotation is unavailable");
            return;
        }
    };
    actix_web::rt::spawn(async move {
        while hangups.recv().await.is_some() {
            let kek = match svc.config.kek() {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the key-encryption key cannot be read; nothing changed");
                    continue;
                }
            };
            if kek.kid == svc.store.envelope().kek().kid {
                tracing::info!(kek = %kek.kid, "SIGHUP: the key-encryption key is unchanged");
                continue;
            }
            match svc.txlog.rotate_kek(kek).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "SIGHUP: the KEK rotation did not start"),
                Err(_) => tracing::error!("SIGHUP: the commit thread has stopped"),
            }
        }
    });
}

/// Serve until the process is stopped.
pub async fn serve(svc: Service) -> std::io::Result<()> {
    let listen = svc.config.listen;
    let workers = svc.config.workers;
    let base_path = svc.config.base_path();
    let data = web::Data::new(svc);
    rotate_kek_on_hangup(data.clone().into_inner());
    tracing::info!(%listen, base = %data.config.base_url, "fhirmament listening");
    HttpServer::new(move || {
        let scope = if base_path.is_empty() {
            "".to_string()
        } else {
            base_path.clone()
        };
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(usize::MAX))
            .wrap(middleware::Compress::default())
            .wrap(middleware::from_fn(http::strip_identity_encoding))
            .wrap(middleware::from_fn(http::cors))
            .route("/health/live", web::get().to(http::live))
            .route("/health/ready", web::get().to(http::ready))
            .service(
                web::scope(&scope)
                    .route(
                        "/.well-known/smart-configuration",
                        web::get().to(http::oauth::smart_configuration),
                    )
                    .route(
                        "/.well-known/openid-configuration",
                        web::get().to(http::oauth::openid_configuration),
                    )
                    .route("/auth/jwks", web::get().to(http::oauth::jwks))
                    .route("/auth/authorize", web::get().to(http::oauth::authorize))
                    .route("/auth/authorize", web::post().to(http::oauth::authorize))
                    .route("/auth/login", web::post().to(http::oauth::login))
                    .route("/auth/approve", web::post().to(http::oauth::approve))
                    .route("/auth/token", web::post().to(http::oauth::token))
                    .route("/auth/introspect", web::post().to(http::oauth::introspect))
                    .route("/auth/revoke", web::post().to(http::oauth::revoke))
                    .route("/auth/launch", web::post().to(http::oauth::launch))
                    .route("/auth/register", web::post().to(http::oauth::register))
                    .default_service(web::to(http::dispatch)),
            )
            .default_service(web::to(http::not_found))
    })
    .workers(workers)
    // Responses are written in one go; Nagle would hold their tails for the client's delayed ACK.
    .tcp_nodelay(true)
    .bind(listen)?
    .run()
    .await
}
