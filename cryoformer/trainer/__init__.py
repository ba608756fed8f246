"""cryoformer.trainer — training runs and the run directories they write.

Public API
----------
TrainConfig, ModelOptions, default_model_config
    What to train on and how (frozen option groups); the architecture options of the
    ``train`` command and the ModelConfig they map to.
train, TrainResult, TrainingDiverged
    Run (or resume) training; one process or one rank of a torchrun/DDP job.
load_run, list_epochs, TrainedRun
    Read a run directory back: the model of an epoch, its latents, configs and data paths.
encode_particles
    Latents (and predicted poses) of every particle, for a trained model.

The run-directory layout is described in :mod:`cryoformer.trainer.outputs`.
"""

from .config import ModelOptions, TrainConfig, default_model_config
from .inference import encode_particles
from .loop import TrainingDiverged, TrainResult, train
from .run_dir import TrainedRun, list_epochs, load_run

__all__ = [
    "ModelOptions",
    "TrainConfig",
    "TrainResult",
    "TrainedRun",
    "TrainingDiverged",
    "default_model_config",
    "encode_particles",
    "list_epochs",
    "load_run",
    "train",
]
