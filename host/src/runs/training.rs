//! Training runs: fine-tune a base MMDetection model on a COCO dataset; the best epoch by
//! `coco/bbox_mAP` becomes a new (unpublished) model.

use serde::Deserialize;
use uuid::Uuid;

use super::files::RunFiles;
use super::{
    attempt_device, enqueue_run_job, existing_file, lease_lost, require_name, run_driver,
    run_id_of, storage_failure, HandlerFuture, RunError, RunService, TRAINING_KIND,
    TRAINING_RUN_PARAMETER,
};
use crate::config::Config;
use crate::executor::{JobContext, JobHandler};
use crate::state::JobError;
use crate::storage::jobs;
use crate::storage::runs::{self, NewModel, NewTrainingRun, TrainingRunRow};

pub const DEFAULT_BASE_CONFIG: &str = "mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py";

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTrainingRun {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A COCO export: `train/`, `valid/`, `test/`, each with `annotations_coco.json`.
    pub dataset_path: String,
    /// Base model config (a path, or `mmdet::...` from the installed package).
    #[serde(default)]
    pub base_config: Option<String>,
    #[serde(default)]
    pub base_checkpoint: Option<String>,
    #[serde(default)]
    pub epochs: Option<i32>,
    #[serde(default)]
    pub batch_size: Option<i32>,
    #[serde(default)]
    pub frozen_stages: Option<i32>,
    #[serde(default)]
    pub device: Option<String>,
}

fn in_range(field: &'static str, value: i32, low: i32, high: i32) -> Result<i32, RunError> {
    if value < low || value > high {
        return Err(RunError::Invalid {
            field,
            problem: format!("{value} is not between {low} and {high}"),
        });
    }
    Ok(value)
}

impl RunService {
    pub async fn create_training_run(
        &self,
        request: &CreateTrainingRun,
    ) -> Result<TrainingRunRow, RunError> {
        require_name(&request.name)?;
        let dataset = existing_file("dataset_path", &request.dataset_path)?;
        for split in ["train", "valid", "test"] {
            if !dataset.join(split).join("annotations_coco.json").is_file() {
                return Err(RunError::Invalid {
                    field: "dataset_path",
                    problem: format!("{} has no {split}/annotations_coco.json", dataset.display()),
                });
            }
        }
        let base_config = match request.base_config.as_deref() {
            None => DEFAULT_BASE_CONFIG.to_owned(),
            Some(config) if config.starts_with("mmdet::") => config.to_owned(),
            Some(config) => existing_file("base_config", config)?.display().to_string(),
        };
        let base_checkpoint = request
            .base_checkpoint
            .as_deref()
            .map(|path| existing_file("base_checkpoint", path).map(|p| p.display().to_string()))
            .transpose()?;
        let epochs = in_range("epochs", request.epochs.unwrap_or(15), 1, 10_000)?;
        let batch_size = in_range("batch_size", request.batch_size.unwrap_or(2), 1, 1024)?;
        let frozen_stages = in_range("frozen_stages", request.frozen_stages.unwrap_or(2), -1, 4)?;
        if let Some(device) = &request.device {
            if device != "cpu" && device != "cuda" {
                return Err(RunError::Invalid {
                    field: "device",
                    problem: format!("{device:?} is not \"cpu\" or \"cuda\""),
                });
            }
        }
        let id = Uuid::now_v7();
        let mut tx = self.pool.begin().await?;
        let job_id = enqueue_run_job(
            &self.client,
            &mut tx,
            TRAINING_KIND,
            TRAINING_RUN_PARAMETER,
            id,
        )
        .await?;
        let dataset = dataset.display().to_string();
        runs::insert_training_run(
            &mut tx,
            &NewTrainingRun {
                id,
                name: request.name.trim(),
                description: request.description.as_deref(),
                dataset_path: &dataset,
                base_config: &base_config,
                base_checkpoint: base_checkpoint.as_deref(),
                epochs,
                batch_size,
                frozen_stages,
                device: request.device.as_deref(),
                job_id,
            },
        )
        .await?;
        tx.commit().await?;
        runs::get_training_run(&self.pool, id)
            .await?
            .ok_or(RunError::NotFound {
                what: "training run",
                id,
            })
    }
}

/// `result.json` as the training driver writes it.
#[derive(Debug, Deserialize)]
struct TrainingResult {
    config: String,
    checkpoint: String,
    #[serde(default)]
    best_epoch: Option<i64>,
    #[serde(default)]
    classes: Vec<String>,
}

pub struct TrainingRunHandler {
    files: RunFiles,
}

impl TrainingRunHandler {
    pub fn new(config: &Config) -> Self {
        Self {
            files: RunFiles::new(config),
        }
    }
}

impl JobHandler for TrainingRunHandler {
    fn run<'a>(&'a self, ctx: &'a JobContext) -> HandlerFuture<'a> {
        Box::pin(async move {
            let run_id = run_id_of(ctx, TRAINING_RUN_PARAMETER).await?;
            let run = runs::get_training_run(&ctx.pool, run_id)
                .await
                .map_err(storage_failure)?
                .ok_or_else(|| {
                    JobError::new(
                        "RunNotFound",
                        format!("training run {run_id} does not exist"),
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
                runs::start_training_run(&mut tx, run_id, &device.describe())
                    .await
                    .map_err(storage_failure)?;
                tx.commit().await.map_err(storage_failure)?;
            }
            let work_dir = self.files.training_work_dir(run_id);
            let mut args = vec![
                "--dataset".into(),
                run.dataset_path.clone().into(),
                "--work-dir".into(),
                work_dir.clone().into_os_string(),
                "--base-config".into(),
                run.base_config.clone().into(),
                "--epochs".into(),
                run.epochs.to_string().into(),
                "--batch-size".into(),
                run.batch_size.to_string().into(),
                "--frozen-stages".into(),
                run.frozen_stages.to_string().into(),
                "--device".into(),
                device.torch_device().into(),
            ];
            if let Some(checkpoint) = &run.base_checkpoint {
                args.extend(["--base-checkpoint".into(), checkpoint.clone().into()]);
            }
            run_driver(ctx, &self.files, run_id, "train.py", args).await?;
            let result_path = work_dir.join("result.json");
            let text = std::fs::read_to_string(&result_path).map_err(|e| {
                JobError::new("MissingOutput", format!("{}: {e}", result_path.display()))
            })?;
            let result: TrainingResult = serde_json::from_str(&text).map_err(|e| {
                JobError::new("InvalidOutput", format!("{}: {e}", result_path.display()))
            })?;
            let model_id = Uuid::now_v7();
            let classes = serde_json::json!(result.classes);
            let name = match result.best_epoch {
                Some(epoch) => format!("{} (epoch {epoch})", run.name),
                None => run.name.clone(),
            };
            let mut tx = ctx.pool.begin().await.map_err(storage_failure)?;
            if !jobs::lock_if_held(&mut tx, &ctx.fence)
                .await
                .map_err(storage_failure)?
            {
                return Err(lease_lost());
            }
            runs::insert_model(
                &mut tx,
                &NewModel {
                    id: model_id,
                    name: &name,
                    config_path: &result.config,
                    checkpoint_path: &result.checkpoint,
                    classes: &classes,
                    training_run_id: Some(run_id),
                },
            )
            .await
            .map_err(storage_failure)?;
            runs::set_trained_model(&mut tx, run_id, model_id)
                .await
                .map_err(storage_failure)?;
            tx.commit().await.map_err(storage_failure)?;
            tracing::info!(run = %run_id, model = %model_id, "training run produced a model");
            Ok(())
        })
    }
}
