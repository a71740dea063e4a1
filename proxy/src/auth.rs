//! App authentication: `Authorization: ApiKey <app_id> <key>`, keys compared in constant time
//! (as SHA-256 digests, so not even the length leaks).

use std::collections::HashMap;

use actix_web::HttpRequest;
use photon::{http::ApiError, wire::AppId};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub struct AppKeys {
    digests: HashMap<AppId, [u8; 32]>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl AppKeys {
    pub fn new(apps: &HashMap<AppId, String>) -> Self {
        Self { digests: apps.iter().map(|(app, key)| (app.clone(), digest(key))).collect() }
    }

    /// The app the request authenticates as, or `401`.
    pub fn authenticate(&self, req: &HttpRequest) -> Result<AppId, ApiError> {
        let refuse =
            || ApiError::Unauthorized("missing or wrong credentials: send Authorization: ApiKey <app id> <key>".into());
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(refuse)?;
        let mut parts = header.split_whitespace();
        let (Some(scheme), Some(app), Some(key), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse());
        };
        if !scheme.eq_ignore_ascii_case("ApiKey") {
            return Err(refuse());
        }
        let given = digest(key);
        let app = AppId::parse(app).map_err(|_| refuse())?;
        // Compare against a dummy for unknown apps, so timing doesn't tell which apps exist.
        let expected = self.digests.get(&app).copied().unwrap_or([0xa5; 32]);
        if bool::from(given.ct_eq(&expected)) && self.digests.contains_key(&app) {
            Ok(app)
        } else {
            Err(refuse())
        }
    }
}
