"""Sparse autoencoders: architectures, training, metrics, activation stores, dashboards,
interventions and splicing into the model (SAELens's hook points). SAELens-compatible files
(cfg.json + sae_weights.safetensors)."""

from workbench.cache.activations import ActivationStore, TensorSource, model_activations, stream_activations
from workbench.sae.files import load_sae, save_sae
from workbench.sae.metrics import ReconstructionStats, mmcs
from workbench.sae.modules import ARCHITECTURES, SAE, SAEConfig, make_sae
from workbench.sae.splice import SplicedSAE, attach, attached, detach, splice
from workbench.sae.synthetic import SyntheticFeatures, load_ground_truth
from workbench.sae.training import SAETrainConfig, TrainingDiverged, train_sae, train_saes

__all__ = ["ARCHITECTURES", "SAE", "ActivationStore", "ReconstructionStats", "SAEConfig", "SAETrainConfig",
           "SplicedSAE", "SyntheticFeatures", "TensorSource", "TrainingDiverged", "attach", "attached", "detach",
           "load_ground_truth", "load_sae", "make_sae", "mmcs", "model_activations", "save_sae", "splice",
           "stream_activations", "train_sae", "train_saes"]
