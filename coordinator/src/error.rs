//! API errors: every failure is a JSON `ErrorBody` with a stable `code`, a message a person can act
//! on and the matching HTTP status. Internal details are logged, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shoal_protocol::api::{Conflict, ErrorBody, ErrorCode};

use crate::chunks::ChunkError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(ErrorBody { code, message: message.into(), conflicts: Vec::new() })
    }

    pub fn stale(conflicts: Vec<Conflict>) -> Self {
        let n = conflicts.len();
        ApiError(ErrorBody {
            code: ErrorCode::StaleBase,
            message: format!("{n} path(s) changed since the commit's base; re-plan against the returned heads"),
            conflicts,
        })
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn status(&self) -> StatusCode {
        match self.0.code {
            ErrorCode::BadRequest
            | ErrorCode::InvalidJson
            | ErrorCode::InvalidPath
            | ErrorCode::InvalidManifest
            | ErrorCode::HashMismatch => StatusCode::BAD_REQUEST,
            ErrorCode::UnknownChunk => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::InviteInvalid => StatusCode::FORBIDDEN,
            ErrorCode::NotFound | ErrorCode::ChunkUnavailable => StatusCode::NOT_FOUND,
            ErrorCode::StaleBase | ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::PendingLimit => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::QuotaExceeded => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.0)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "metadata store failure");
        ApiError::new(ErrorCode::Internal, "the coordinator's metadata store failed; try again later")
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        tracing::error!(error = %e, "chunk store failure");
        ApiError::new(ErrorCode::Internal, "the coordinator's chunk store failed; try again later")
    }
}

impl From<ChunkError> for ApiError {
    fn from(e: ChunkError) -> Self {
        match e {
            ChunkError::NotFound(id) | ChunkError::Corrupt(id) => ApiError::new(
                ErrorCode::ChunkUnavailable,
                format!(
                    "chunk {id} is not stored intact (lost or damaged); it is served again once a device uploads it again"
                ),
            ),
            ChunkError::Index(e) => e.into(),
            ChunkError::Backend(e) => {
                tracing::error!(error = %e, "chunk storage failure");
                ApiError::new(ErrorCode::Internal, "the coordinator's chunk storage failed; try again later")
            }
        }
    }
}
