//! A deadline for every API call the kubelet and controllers make: a wedged API server
//! must surface as an error to retry, never as a task stuck forever.

use std::future::Future;
use std::time::Duration;

/// How long one API request may take; requests here are small and local.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer from the API server within {API_TIMEOUT:?}")]
    Timeout,
}

impl CallError {
    /// The HTTP status of an API error response, if that is what it was.
    pub fn status(&self) -> Option<u16> {
        match self {
            CallError::Api(kube::Error::Api(s)) => Some(s.code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}

/// Runs one API request with [`API_TIMEOUT`].
pub async fn call<T>(
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(API_TIMEOUT, request).await {
        Ok(result) => result.map_err(CallError::Api),
        Err(_) => Err(CallError::Timeout),
    }
}
