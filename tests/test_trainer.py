import json

import pytest
import torch

from lm_saes import Initializer, InitializerConfig, SAEConfig, Trainer, TrainerConfig


def planted_stream(n_batches: int, batch: int = 256, d: int = 16, n_features: int = 32, seed: int = 0):
    """Activations that are sparse non-negative combinations of fixed random directions."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    for _ in range(n_batches):
        active = torch.rand(batch, n_features, generator=g) < 0.08
        codes = torch.rand(batch, n_features, generator=g) * active
        yield {"h": codes @ directions * 4, "tokens": torch.zeros(batch, dtype=torch.long)}


def _sae():
    cfg = SAEConfig(hook_point_in="h", d_model=16, expansion_factor=4)
    return Initializer(InitializerConfig()).initialize_sae_from_config(cfg, planted_stream(2, seed=99))


def test_training_learns_a_sparse_reconstruction(tmp_path) -> None:
    torch.manual_seed(0)
    sae = _sae()
    cfg = TrainerConfig(lr=3e-3, l1_coefficient=1.0, total_training_tokens=256 * 300, log_frequency=50,
                        exp_result_path=str(tmp_path))
    final = Trainer(cfg).fit(sae, planted_stream(400))
    assert final["explained_variance"] > 0.85
    assert final["l0"] < 16  # a code sparser than the 16 input dimensions (~2.6 planted features per row)
    assert final["n_training_tokens"] == 256 * 300
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["explained_variance"] == final["explained_variance"]


def test_training_frees_the_sparse_steps_buffer_when_it_ends(tmp_path, monkeypatch) -> None:
    from lm_saes.sae import sparse_step

    held = []  # how many buffers were held after each step handed its pre-activations back
    recycle = sparse_step.recycle
    monkeypatch.setattr("lm_saes.sae.model.recycle",
                        lambda pre: (recycle(pre), held.append(len(sparse_step._SPARE))))
    torch.manual_seed(0)
    sae = _sae()
    sae.cfg = sae.cfg.model_copy(update={"sparse_max_density": 1.0})  # every step sparse
    cfg = TrainerConfig(lr=3e-3, total_training_tokens=256 * 4, exp_result_path=str(tmp_path))
    Trainer(cfg).fit(sae, planted_stream(8))
    assert held and held[-1] >= 1
    assert sparse_step._SPARE == {}


def test_the_sparse_backward_writes_into_last_steps_gradients_without_changing_training(tmp_path,
                                                                                       monkeypatch) -> None:
    from lm_saes.sae import sparse_step

    def train(recycling: bool, run_dir) -> tuple[dict, int]:
        reused = []  # the gradients' shapes that a step's backward found recycled and wrote into
        spare_or_empty = sparse_step.spare_or_empty

        def taking(shape, like):
            spare = sparse_step._SPARE.get((tuple(shape), like.dtype))
            out = spare_or_empty(shape, like)
            if out is spare:
                reused.append(tuple(shape))
            return out

        monkeypatch.setattr(sparse_step, "spare_or_empty", taking)
        if not recycling:
            monkeypatch.setattr("lm_saes.trainer.recycle_grads", lambda params: None)
        torch.manual_seed(0)
        sae = _sae()
        sae.cfg = sae.cfg.model_copy(update={"sparse_max_density": 1.0})  # every step sparse
        cfg = TrainerConfig(lr=3e-3, total_training_tokens=256 * 5, exp_result_path=str(run_dir))
        Trainer(cfg).fit(sae, planted_stream(8))
        return {k: v.clone() for k, v in sae.state_dict().items()}, reused.count(tuple(sae.W_E.shape))

    recycled, reused = train(True, tmp_path / "recycled")
    fresh, reused_without = train(False, tmp_path / "fresh")
    assert (reused, reused_without) == (4, 0)  # steps 2-5 wrote W_E's gradient into the step before's
    for name, value in fresh.items():
        assert torch.equal(recycled[name], value), name


def test_budget_smaller_than_a_batch_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="smaller than one batch"):
        Trainer(TrainerConfig(total_training_tokens=100, exp_result_path=str(tmp_path))).fit(_sae(), planted_stream(2))


def test_learning_rate_warms_up_holds_and_cools_down(tmp_path) -> None:
    lrs = []

    class Recorder:
        def log(self, data, step):
            lrs.append(data["train/lr"])

        def finish(self):
            pass

    cfg = TrainerConfig(lr=1e-3, total_training_tokens=256 * 20, lr_warm_up_steps=5, lr_cool_down_steps=5,
                        log_frequency=1, exp_result_path=str(tmp_path))
    Trainer(cfg).fit(_sae(), planted_stream(20), wandb_run=Recorder())
    # After step s (1-based), the scheduler holds the factor for step s: warm-up (s+1)/5, then 1, then (20-s)/5.
    expected = [min((s + 1) / 5, 1.0) if s < 15 else (20 - s) / 5 for s in range(1, 21)]
    assert lrs == pytest.approx([1e-3 * e for e in expected])


def test_dead_latents_are_those_that_never_fired(tmp_path) -> None:
    sae = _sae()
    with torch.no_grad():
        sae.b_E[:10] = -1e6  # these can never fire
    cfg = TrainerConfig(lr=1e-4, total_training_tokens=256 * 4, log_frequency=4, exp_result_path=str(tmp_path))
    final = Trainer(cfg).fit(sae, planted_stream(4))
    assert final["n_dead"] >= 10


def test_a_non_finite_loss_stops_training(tmp_path) -> None:
    def poisoned():
        for batch in planted_stream(3):
            batch["h"][0, 0] = float("nan")
            yield batch

    with pytest.raises(FloatingPointError, match="loss became nan"):
        Trainer(TrainerConfig(total_training_tokens=512, exp_result_path=str(tmp_path))).fit(_sae(), poisoned())


def test_evaluate_runs_every_eval_frequency_steps_and_at_the_end(tmp_path) -> None:
    calls, logged = [], []

    def evaluate(sae):
        calls.append(sae.W_D.detach().clone())
        return {"ce_loss_score": 0.5 + len(calls), "kl_div_score": None}

    class Recorder:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            pass

    cfg = TrainerConfig(lr=1e-3, total_training_tokens=256 * 10, log_frequency=5, eval_frequency=4,
                        exp_result_path=str(tmp_path))
    final = Trainer(cfg).fit(_sae(), planted_stream(10), wandb_run=Recorder(), evaluate=evaluate)
    assert len(calls) == 3  # steps 4 and 8, then once after step 10
    assert not torch.equal(calls[0], calls[-1])  # evaluated while training, not once at the start
    eval_steps = [step for step, data in logged if "eval/ce_loss_score" in data]
    assert eval_steps == [4, 8, 10]
    assert final["ce_loss_score"] == 3.5 and "kl_div_score" not in final  # undefined scores are left out
    assert json.loads((tmp_path / "metrics.json").read_text())["ce_loss_score"] == 3.5


def test_eval_frequency_zero_evaluates_only_at_the_end(tmp_path) -> None:
    calls = []
    cfg = TrainerConfig(total_training_tokens=256 * 4, log_frequency=2, exp_result_path=str(tmp_path))
    Trainer(cfg).fit(_sae(), planted_stream(4), evaluate=lambda sae: calls.append(1) or {"ce_loss_score": 1.0})
    assert calls == [1]
