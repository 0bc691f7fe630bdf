"""The Language-Model-SAEs walkthrough, step by step, with the embedded model and corpus swapped in.

    .venv/bin/python scripts/walkthrough.py [--tokens 300000] [--out results]

Only the names change from the walkthrough: "EleutherAI/pythia-160m" -> "builtin:smollm2-135m" (d_model 576),
"Hzfinfdu/SlimPajama-3B" -> "builtin:python-docs", "cuda" -> "cpu".
"""

from __future__ import annotations

import argparse

import torch

from lm_saes import (
    ActivationFactory,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
    BufferShuffleConfig,
    DatasetConfig,
    Initializer,
    InitializerConfig,
    LanguageModelConfig,
    SAEConfig,
    Trainer,
    TrainerConfig,
    TransformerLensLanguageModel,
    load_dataset,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tokens", type=int, default=300_000)
parser.add_argument("--out", default="results")
args = parser.parse_args()

# Load model & dataset
model = TransformerLensLanguageModel(
    LanguageModelConfig(
        model_name="builtin:smollm2-135m",
        device="cpu",
        dtype="torch.float32",
    )
)
dataset = load_dataset(DatasetConfig(dataset_name_or_path="builtin:python-docs"))

# Generate activations
activation_factory = ActivationFactory(
    ActivationFactoryConfig(
        sources=[ActivationFactoryDatasetSource(name="python-docs")],
        target=ActivationFactoryTarget.ACTIVATIONS_1D,
        hook_points=["blocks.6.hook_resid_post"],
        batch_size=1024,
        buffer_size=1024 * 8,
        buffer_shuffle=BufferShuffleConfig(
            perm_seed=42,
            generator_device="cpu",
        ),
    )
)
activations_stream = activation_factory.process(
    model=model,
    model_name="smollm2-135m",
    datasets={"python-docs": dataset},
)

# Configure the SAE
sae_cfg = SAEConfig(
    hook_point_in="blocks.6.hook_resid_post",
    hook_point_out="blocks.6.hook_resid_post",
    d_model=576,
    expansion_factor=8,
    act_fn="relu",
    dtype=torch.float32,
    device="cpu",
)

# Initialize the SAE
initializer = Initializer(InitializerConfig(grid_search_init_norm=True))
sae = initializer.initialize_sae_from_config(sae_cfg, activation_stream=activations_stream)

# Configure the trainer
trainer = Trainer(
    TrainerConfig(
        amp_dtype=torch.float32,
        lr=3e-3,
        l1_coefficient=3.0,
        total_training_tokens=args.tokens,
        log_frequency=25,
        exp_result_path=args.out,
    )
)

# Train and save
sae.cfg.save_hyperparameters(args.out)
trainer.fit(sae=sae, activation_stream=activations_stream)
sae.save_pretrained(save_path=args.out)
print(f"saved to {args.out}")
