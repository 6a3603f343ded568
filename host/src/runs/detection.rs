//! Detection runs: tiled MMDetection inference over an image with a trained model.

use std::path::Path;

use serde::Deserialize;
use uuid::Uuid;

use super::files::RunFiles;
use super::{
    attempt_device, enqueue_run_job, existing_file, lease_lost, require_name, run_driver,
    run_id_of, storage_failure, HandlerFuture, RunError, RunService, DETECTION_KIND,
    DETECTION_RUN_PARAMETER,
};
use crate::config::Config;
use crate::executor::{JobContext, JobHandler};
use crate::state::JobError;
use crate::storage::jobs;
use crate::storage::runs::{self, Detection, DetectionRunRow, NewDetectionRun};

/// What a user submits.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDetectionRun {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Path of the image on the server (PNG, JPEG, TIFF...).
    pub image_path: String,
    pub model_id: Uuid,
    /// Detections scoring below are dropped. Default 0.3.
    #[serde(default)]
    pub score_threshold: Option<f32>,
    /// "cpu" or "cuda"; default: whatever slot the server gives the run.
    #[serde(default)]
    pub device: Option<String>,
}

impl RunService {
    pub async fn create_detection_run(
        &self,
        request: &CreateDetectionRun,
    ) -> Result<DetectionRunRow, RunError> {
        require_name(&request.name)?;
        let image = existing_file("image_path", &request.image_path)?;
        if !image.is_file() {
            return Err(RunError::Invalid {
                field: "image_path",
                problem: format!("{} is not a file", image.display()),
            });
        }
        let threshold = request.score_threshold.unwrap_or(0.3);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(RunError::Invalid {
                field: "score_threshold",
                problem: format!("{threshold} is not between 0 and 1"),
            });
        }
        if let Some(device) = &request.device {
            if device != "cpu" && device != "cuda" {
                return Err(RunError::Invalid {
                    field: "device",
                    problem: format!("{device:?} is not \"cpu\" or \"cuda\""),
                });
            }
        }
        if runs::get_model(&self.pool, request.model_id)
            .await?
            .is_none()
        {
            return Err(RunError::Invalid {
                field: "model_id",
                problem: format!("no model {} exists", request.model_id),
            });
        }
        let id = Uuid::now_v7();
        let mut tx = self.pool.begin().await?;
        let job_id = enqueue_run_job(
            &self.client,
            &mut tx,
            DETECTION_KIND,
            DETECTION_RUN_PARAMETER,
            id,
        )
        .await?;
        let image = image.display().to_string();
        runs::insert_detection_run(
            &mut tx,
            &NewDetectionRun {
                id,
                name: request.name.trim(),
                description: request.description.as_deref(),
                image_path: &image,
                model_id: request.model_id,
                score_threshold: threshold,
                device: request.device.as_deref(),
                job_id,
            },
        )
        .await?;
        tx.commit().await?;
        runs::get_detection_run(&self.pool, id)
            .await?
            .ok_or(RunError::NotFound {
                what: "detection run",
                id,
            })
    }
}

/// `detection_bboxes.json` as the driver writes it.
#[derive(Debug, Deserialize)]
struct DetectionOutput {
    detections: Vec<DriverDetection>,
}

#[derive(Debug, Deserialize)]
struct DriverDetection {
    bbox: [f32; 4],
    score: f32,
    label: i32,
    #[serde(default)]
    class_name: Option<String>,
}

pub fn read_detections(path: &Path) -> Result<Vec<Detection>, JobError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| JobError::new("MissingOutput", format!("{}: {e}", path.display())))?;
    let output: DetectionOutput = serde_json::from_str(&text)
        .map_err(|e| JobError::new("InvalidOutput", format!("{}: {e}", path.display())))?;
    Ok(output
        .detections
        .into_iter()
        .map(|d| Detection {
            x1: d.bbox[0],
            y1: d.bbox[1],
            x2: d.bbox[2],
            y2: d.bbox[3],
            score: d.score,
            label: d.label,
            class_name: d.class_name,
        })
        .collect())
}

pub struct DetectionRunHandler {
    files: RunFiles,
}

impl DetectionRunHandler {
    pub fn new(config: &Config) -> Self {
        Self {
            files: RunFiles::new(config),
        }
    }
}

impl JobHandler for DetectionRunHandler {
    fn run<'a>(&'a self, ctx: &'a JobContext) -> HandlerFuture<'a> {
        Box::pin(async move {
            let run_id = run_id_of(ctx, DETECTION_RUN_PARAMETER).await?;
            let run = runs::get_detection_run(&ctx.pool, run_id)
                .await
                .map_err(storage_failure)?
                .ok_or_else(|| {
                    JobError::new(
                        "RunNotFound",
                        format!("detection run {run_id} does not exist"),
                    )
                })?;
            let model = runs::get_model(&ctx.pool, run.model_id)
                .await
                .map_err(storage_failure)?
                .ok_or_else(|| {
                    JobError::new(
                        "ModelNotFound",
                        format!("model {} does not exist", run.model_id),
                    )
                })?;
            let device = attempt_device(ctx);
            {
                let mut tx = ctx.pool.begin().await.map_err(storage_failure)?;
                if !jobs::lock_if_held(&mut tx, &ctx.fence)
                    .await
                    .map_err(storage_failure)?
                {
                    return Err(lease_lost());
                }
                runs::start_detection_run(&mut tx, run_id, &device.describe())
                    .await
                    .map_err(storage_failure)?;
                tx.commit().await.map_err(storage_failure)?;
            }
            let out_dir = self.files.detection_output(run_id);
            let args = vec![
                "--image".into(),
                run.image_path.clone().into(),
                "--config".into(),
                model.config_path.clone().into(),
                "--checkpoint".into(),
                model.checkpoint_path.clone().into(),
                "--out-dir".into(),
                out_dir.clone().into_os_string(),
                "--score-threshold".into(),
                run.score_threshold.to_string().into(),
                "--device".into(),
                device.torch_device().into(),
            ];
            run_driver(ctx, &self.files, run_id, "detect.py", args).await?;
            let found = read_detections(&out_dir.join("detection_bboxes.json"))?;
            let mut tx = ctx.pool.begin().await.map_err(storage_failure)?;
            if !jobs::lock_if_held(&mut tx, &ctx.fence)
                .await
                .map_err(storage_failure)?
            {
                return Err(lease_lost());
            }
            runs::replace_detections(&mut tx, run_id, &found)
                .await
                .map_err(storage_failure)?;
            tx.commit().await.map_err(storage_failure)?;
            tracing::info!(run = %run_id, detections = found.len(), "detection run finished");
            Ok(())
        })
    }
}
