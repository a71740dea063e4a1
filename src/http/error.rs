//! `ApiError`: every error the broker answers, turned into an HTTP status in exactly one place.

use actix_web::{http::StatusCode, HttpResponse, ResponseError};

use crate::{
    actors::EngineError,
    crypto::session::AuthError,
    wire::{ErrorBody, ProxyId},
};

/// Header telling a proxy its session is gone and it should handshake again.
pub const REAUTH_HEADER: &str = "x-photon-reauth";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    SessionGone(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// A message within the body limit that, sealed, is larger than its recipients take.
    #[error("{0}")]
    SealedTooLarge(String),
    #[error("recipients without a valid certificate: {0:?}")]
    MissingCerts(Vec<ProxyId>),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("the monitoring endpoints need Basic auth with an empty user and MONITORING_API_KEY as password")]
    MonitoringAuth,
    /// A second instance of a proxy that is online (`409`, marked for the proxy).
    #[error("{0}")]
    Duplicate(String),
    #[error("{0}")]
    BadGateway(String),
    /// A bug: the handler panicked (the worker keeps serving; see `ops::requests::observe`).
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    GatewayTimeout(String),
    /// The client stopped sending its request body.
    #[error("{0}")]
    RequestTimeout(String),
    /// An error answer from the broker, passed on to the app as it came.
    #[error("the broker answered {status}")]
    Relayed { status: StatusCode, body: bytes::Bytes },
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::BadRequest(_) => Self::BadRequest(msg),
            EngineError::Forbidden(_) => Self::Forbidden(msg),
            EngineError::NotFound => Self::NotFound(msg),
            EngineError::Conflict(_) => Self::Conflict(msg),
            EngineError::Gone => Self::Gone(msg),
            EngineError::Unavailable => Self::Unavailable(msg),
            EngineError::Internal(_) => Self::Internal(msg),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::UnknownSession => Self::SessionGone(e.to_string()),
            _ => Self::Unauthorized(e.to_string()),
        }
    }
}

impl ApiError {
    /// The JSON body of the error's answer: `{"error": "..."}`, except a `424`'s and a relayed one.
    pub fn json_body(&self) -> bytes::Bytes {
        match self {
            // beam-lib parses the 424 body as the array of offending proxy ids.
            Self::MissingCerts(ids) => serde_json::to_vec(ids).expect("ids serialize").into(),
            Self::Relayed { body, .. } => body.clone(),
            _ => serde_json::to_vec(&ErrorBody { error: self.to_string() }).expect("errors serialize").into(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) | Self::SessionGone(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::TooLarge { .. } | Self::SealedTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MissingCerts(_) => StatusCode::FAILED_DEPENDENCY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::MonitoringAuth => StatusCode::UNAUTHORIZED,
            Self::Duplicate(_) => StatusCode::CONFLICT,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Relayed { status, .. } => *status,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        match self {
            Self::SessionGone(_) => res.insert_header((REAUTH_HEADER, "1")),
            Self::MonitoringAuth => res.insert_header(("www-authenticate", "Basic realm=\"photon monitoring\"")),
            Self::Duplicate(_) => res.insert_header((crate::wire::broker::DUPLICATE_HEADER, "1")),
            Self::Unauthorized(_) => res.insert_header(("www-authenticate", "ApiKey")),
            _ => &mut res,
        };
        res.content_type("application/json").body(self.json_body())
    }
}
