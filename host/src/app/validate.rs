//! `[validate]` at deploy: the cases run, one after another, against the version that was
//! just compiled and whose models were just loaded, before it is published. These are real
//! invocations on fresh instances, with the version's limits, but nobody is billed: no usage
//! record, no metrics, no drift summaries, no inference cache.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;

use super::{App, DeployError, Deployer};
use crate::monitor::validate::{
    CaseResult, MAX_CASES_BYTES, ValidateSpec, ValidationResult, parse_cases,
};
use crate::nn::NnSpec;
use crate::runtime::{LoadedVersion, Timings};

impl App {
    /// Runs `spec`'s cases against `loaded` (with the models of `nn`, answering within
    /// `timeout_ms`) and judges them.
    pub(super) async fn validate_version(
        &self,
        loaded: &Arc<LoadedVersion>,
        nn: &NnSpec,
        timeout_ms: u64,
        spec: &ValidateSpec,
        by: &Deployer,
    ) -> Result<ValidationResult, DeployError> {
        spec.check().map_err(DeployError::Validation)?;
        self.check_blob(&spec.cases, by).await?;
        let size = self
            .blobs
            .size(&spec.cases)
            .await?
            .ok_or(DeployError::MissingBlob(spec.cases))?;
        if size > MAX_CASES_BYTES {
            return Err(DeployError::Validation(format!(
                "the cases file is {size} bytes; at most {MAX_CASES_BYTES}"
            )));
        }
        if by.signer.is_some() {
            self.verify_blob(&spec.cases).await?;
        }
        let path = self.local_blob(&spec.cases).await?;
        let text = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| DeployError::Validation(format!("the cases file is not text: {e}")))?;
        let cases =
            parse_cases(&text).map_err(|e| DeployError::Validation(format!("cases file: {e}")))?;
        // Models of their own (the same shared graphs): the version's monitors and cache
        // never see validation traffic.
        let models = Arc::new(self.runtime.models().version_models(nn).without_monitors());
        let outbound = self
            .outbound(&by.outbound, timeout_ms)
            .map_err(DeployError::Validation)?;
        // The cases see what requests on the main route will: the function's values if it
        // is still the deployer's (it may have been deleted and made again by someone else
        // while this version compiled), else the defaults.
        let vars = match self.registry.function(loaded.function()) {
            Some(f) if by.admin || *f.owner == *by.tenant => f.variables.clone(),
            _ => Arc::default(),
        }
        .resolve(&by.variables, None)
        .map_err(|e| DeployError::Validation(e.to_string()))?;
        let mut results = Vec::with_capacity(cases.len());
        for case in &cases {
            let mut req = http::Request::builder()
                .method(case.method.clone())
                .uri(case.path.as_str())
                .header(http::header::HOST, "localhost");
            for (k, v) in &case.headers {
                req = req.header(k, v);
            }
            let req = req
                .body(crate::server::full(case.body.clone()))
                .map_err(|e| DeployError::Validation(format!("line {}: {e}", case.line)))?;
            let mut timings = Timings::default();
            let started = Instant::now();
            let outcome = self
                .runtime
                .invoke(
                    loaded.clone(),
                    models.clone(),
                    &outbound,
                    &vars,
                    req,
                    &mut timings,
                )
                .await;
            let (status, prediction, error) = match outcome {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    let said = parts
                        .headers
                        .remove(crate::server::PREDICTION_HEADER)
                        .and_then(|v| crate::server::prediction_of(&v));
                    match body.collect().await {
                        Ok(_) => (
                            Some(parts.status.as_u16()),
                            said.or_else(|| timings.inference.prediction().map(|c| c.to_string())),
                            None,
                        ),
                        Err(e) => (None, None, Some(format!("the response body failed: {e}"))),
                    }
                }
                Err(e) => (None, None, Some(e.to_string())),
            };
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            results.push(CaseResult::judge(case, status, prediction, ms, error));
        }
        Ok(ValidationResult::of(spec, results))
    }
}
