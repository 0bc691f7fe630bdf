"""lm_saes: train sparse autoencoders and transcoders on language-model activations.

The public API is the Language-Model-SAEs walkthrough's names, listed here explicitly. They are imported
on first use, so that `lm-saes --help` answers without loading torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while they wait (libgomp's default) cost every parallel op a scheduler time slice when
# other processes share the cores: on a shared 2-core CPU an op on 200K elements took ~10 ms instead of ~1 ms,
# which made the sparse steps (many small ops) 1.6x their dense step instead of 2.7x. Threads that sleep cost a
# wake-up per op instead: on the idle machine, within a few percent of spinning (README, "OpenMP's wait policy").
# libgomp reads this when torch loads it, so it is set before any torch import; a value the user set wins.
# (PyTorch built with another OpenMP ignores it.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_PUBLIC = {
    "AnalysisConfig": "lm_saes.analysis",
    "FeatureAnalysis": "lm_saes.analysis",
    "FeatureAnalyzer": "lm_saes.analysis",
    "AnalyzeSettings": "lm_saes.runners.analyze",
    "analyze_run": "lm_saes.runners.analyze",
    "CompareSettings": "lm_saes.runners.compare",
    "compare_runs": "lm_saes.runners.compare",
    "DashboardSettings": "lm_saes.runners.dashboard",
    "dashboard_run": "lm_saes.runners.dashboard",
    "ActivationFactory": "lm_saes.activation",
    "ActivationFactoryActivationsSource": "lm_saes.activation",
    "ActivationFactoryConfig": "lm_saes.activation",
    "ActivationFactoryDatasetSource": "lm_saes.activation",
    "ActivationFactoryTarget": "lm_saes.activation",
    "BufferShuffleConfig": "lm_saes.activation",
    "DatasetConfig": "lm_saes.datasets",
    "EvalResult": "lm_saes.evaluator",
    "Evaluator": "lm_saes.evaluator",
    "EvaluatorConfig": "lm_saes.evaluator",
    "EvaluateSettings": "lm_saes.runners.evaluate",
    "GenerateSettings": "lm_saes.runners.generate",
    "InspectSettings": "lm_saes.runners.lens",
    "inspect_text": "lm_saes.runners.lens",
    "generate_activations": "lm_saes.runners.generate",
    "evaluate_run": "lm_saes.runners.evaluate",
    "load_dataset": "lm_saes.datasets",
    "Initializer": "lm_saes.initializer",
    "InitializerConfig": "lm_saes.initializer",
    "LanguageModelConfig": "lm_saes.language_model",
    "TransformerLensLanguageModel": "lm_saes.language_model",
    "TrainSAESettings": "lm_saes.runners.train",
    "WandbConfig": "lm_saes.runners.train",
    "train_sae": "lm_saes.runners.train",
    "train_saes_together": "lm_saes.runners.train_group",
    "SAEConfig": "lm_saes.sae",
    "SparseAutoEncoder": "lm_saes.sae",
    "Trainer": "lm_saes.trainer",
    "TrainerConfig": "lm_saes.trainer",
}
__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from lm_saes.activation import (
        ActivationFactory,
        ActivationFactoryActivationsSource,
        ActivationFactoryConfig,
        ActivationFactoryDatasetSource,
        ActivationFactoryTarget,
        BufferShuffleConfig,
    )
    from lm_saes.analysis import AnalysisConfig, FeatureAnalysis, FeatureAnalyzer
    from lm_saes.datasets import DatasetConfig, load_dataset
    from lm_saes.evaluator import EvalResult, Evaluator, EvaluatorConfig
    from lm_saes.initializer import Initializer, InitializerConfig
    from lm_saes.language_model import LanguageModelConfig, TransformerLensLanguageModel
    from lm_saes.runners.analyze import AnalyzeSettings, analyze_run
    from lm_saes.runners.compare import CompareSettings, compare_runs
    from lm_saes.runners.dashboard import DashboardSettings, dashboard_run
    from lm_saes.runners.evaluate import EvaluateSettings, evaluate_run
    from lm_saes.runners.generate import GenerateSettings, generate_activations
    from lm_saes.runners.lens import InspectSettings, inspect_text
    from lm_saes.runners.train import TrainSAESettings, WandbConfig, train_sae
    from lm_saes.runners.train_group import train_saes_together
    from lm_saes.sae import SAEConfig, SparseAutoEncoder
    from lm_saes.trainer import Trainer, TrainerConfig


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lm_saes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
