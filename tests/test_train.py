"""functrain.train: loop modes, evaluation, results, checkpoints, resume, pretrained, signals, logging."""

import importlib
import json
import os
import signal
import sys
import time

import pytest
import torch

import functrain as ft
from functrain.checkpoint import tree_digest
from functrain.data import Loader
from functrain.shell import Interrupted, TrainConfig, evaluate, make_predict_step, predict, train

train_module = importlib.import_module("functrain.shell.train")
sys.path.insert(0, os.path.dirname(__file__))
from helpers.tiny import MLP, dataset, setup  # noqa: E402


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_step_mode_counts_steps_and_advances_the_data_position():
    state, config = setup(steps=7, eval_every=100)
    out = train(state, config)
    assert int(out.step) == int(out.micro_step) == 7
    assert (int(out.epoch), int(out.data_index)) == (0, 56)  # 12 batches of 8 per epoch
    assert not torch.equal(out.params["net.0.weight"], state.params["net.0.weight"])


def test_epoch_mode_and_accumulation_feed_micro_batches():
    state, config = setup(accumulate=2, steps=None, epochs=2, eval_every=None)
    out = train(state, config)
    assert (int(out.epoch), int(out.data_index)) == (2, 0)
    assert int(out.micro_step) == 24 and int(out.step) == 12


def test_train_equals_a_hand_written_loop_bitwise():
    state, config = setup(steps=10, eval_every=100)
    out = train(state, config)
    s = state
    for (batch, e, i), _ in zip(config.data.iterate(0, 0), range(10)):
        s = config.step(s, batch).replace(epoch=torch.tensor(e), data_index=torch.tensor(i))
    assert tree_digest(s) == tree_digest(out)


def test_results_best_and_early_stopping(tmp_path):
    # lr=0 never improves after the first evaluation: patience 2 stops at the third one.
    state, config = setup(lr=0.0, steps=40, eval_every=2, patience=2, checkpoint_dir=str(tmp_path))
    out = train(state, config)
    assert int(out.step) == 6
    assert (int(out.tracker.best_step), int(out.tracker.bad_evals)) == (2, 2)
    results = _read(tmp_path / "results.json")
    assert [r["step"] for r in results["records"]] == [2, 4, 6] and results["best_step"] == 2
    assert _read(tmp_path / "best.json")["step"] == 2 and _read(tmp_path / "latest.json")["step"] == 6
    assert _read(tmp_path / "best.json")["val"]["loss"] == pytest.approx(float(out.tracker.best_score))


def test_max_mode_picks_the_highest_score(tmp_path):
    state, config = setup(steps=12, eval_every=2, score=("val", "loss", "max"), checkpoint_dir=str(tmp_path))
    out = train(state, config)
    records = _read(tmp_path / "results.json")["records"]
    best = max(records, key=lambda r: r["val"]["loss"])
    assert int(out.tracker.best_step) == best["step"]


def test_resume_continues_bitwise_and_extends_steps(tmp_path):
    state, config = setup(accumulate=2, steps=12, checkpoint_every=3, checkpoint_dir=str(tmp_path / "a"))
    straight = train(state, config)
    half = train(state, config.replace(steps=5, checkpoint_dir=str(tmp_path / "b")))
    assert int(half.step) == 5
    resumed = train(state, config.replace(checkpoint_dir=str(tmp_path / "b"), log_every=3))
    assert tree_digest(resumed) == tree_digest(straight)
    assert _read(tmp_path / "a" / "results.json") == _read(tmp_path / "b" / "results.json")


def test_resume_refuses_a_semantic_change_with_a_diff(tmp_path):
    state, config = setup(steps=2, checkpoint_dir=str(tmp_path))
    train(state, config)
    changed = config.replace(steps=4, hparams={**config.hparams, "lr": 0.5})
    with pytest.raises(ValueError, match=r"hparams.lr: 0.05 -> 0.5"):
        train(state, changed)
    with pytest.raises(FileExistsError, match="resume='never'"):
        train(state, config.replace(resume="never"))


def test_resume_from_a_path_and_pretrained_params_only(tmp_path):
    state, config = setup(steps=4, checkpoint_dir=str(tmp_path / "a"))
    done = train(state, config)
    again = train(state, config.replace(steps=4, checkpoint_dir=None, resume=str(tmp_path / "a")))
    assert tree_digest(again) == tree_digest(done)
    ckpt = str(tmp_path / "a" / "checkpoints" / "step-00000004.msgpack")
    fresh = train(state, config.replace(steps=0, checkpoint_dir=str(tmp_path / "p"), pretrained=ckpt))
    assert tree_digest(fresh.params) == tree_digest(done.params)
    assert int(fresh.step) == 0 and tree_digest(fresh.opt_state) == tree_digest(state.opt_state)


def test_pretrained_prefers_ema_params(tmp_path):
    model = MLP()
    opt = ft.optim.ema(ft.optim.sgd(0.1), decay=0.5)
    state = ft.TrainState.create(model, opt, seed=0)
    ema = {k: torch.full_like(v, 3.0) for k, v in state.params.items()}
    state = state.replace(opt_state=state.opt_state._replace(ema=ema))
    path = str(tmp_path / "s.msgpack")
    ft.checkpoint.save(path, state)
    from functrain.shell.train import load_pretrained

    loaded = load_pretrained(ft.TrainState.create(model, ft.optim.sgd(0.1), seed=0), path)
    assert all(torch.equal(loaded.params[k], ema[k]) for k in ema)


def test_bad_configs_say_how_to_fix_them():
    state, config = setup()
    with pytest.raises(ValueError, match="exactly one of steps"):
        train(state, config.replace(epochs=1))
    with pytest.raises(ValueError, match="'min' | 'max'"):
        train(state, config.replace(score=("val", "loss", "best")))
    with pytest.raises(TypeError, match="functrain.data.Loader"):
        train(state, config.replace(data=[1, 2]))
    with pytest.raises(ValueError, match="score split"):
        train(state, config.replace(score=("test", "loss", "min")))


def _signal_at(step, micro, signum):
    def wrapped(state, batch):
        out = step(state, batch)
        if int(out.micro_step) == micro:
            os.kill(os.getpid(), signum)
        return out

    return wrapped


@pytest.mark.parametrize("micro", [5, 8])  # inside an accumulation window, and at an evaluation step
def test_signal_saves_exits_and_resume_is_exact(tmp_path, micro):
    state, config = setup(accumulate=2, steps=8, eval_every=2, checkpoint_every=100)
    straight = train(state, config.replace(checkpoint_dir=str(tmp_path / "a")))
    before = signal.getsignal(signal.SIGUSR1)
    broken = config.replace(step=_signal_at(config.step, micro, signal.SIGUSR1), checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(Interrupted) as info:
        train(state, broken)
    assert info.value.code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert os.path.exists(info.value.saved) and f"{micro:08d}" in info.value.saved
    resumed = train(state, config.replace(checkpoint_dir=str(tmp_path / "b")))
    assert tree_digest(resumed) == tree_digest(straight)
    assert _read(tmp_path / "a" / "results.json") == _read(tmp_path / "b" / "results.json")


def test_signal_inside_evaluation_reruns_the_evaluation_on_resume(tmp_path):
    state, config = setup(steps=6, eval_every=3)
    straight = train(state, config.replace(checkpoint_dir=str(tmp_path / "a")))
    calls = []

    def eval_step(s, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return config.eval_step(s, batch)

    with pytest.raises(Interrupted):
        train(state, config.replace(eval_step=eval_step, checkpoint_dir=str(tmp_path / "b")))
    assert not os.path.exists(tmp_path / "b" / "results.json")  # the cut evaluation left no record
    resumed = train(state, config.replace(checkpoint_dir=str(tmp_path / "b")))
    assert tree_digest(resumed) == tree_digest(straight)
    assert _read(tmp_path / "a" / "results.json") == _read(tmp_path / "b" / "results.json")


def test_tensorboard_scalars_are_readable_and_heartbeat_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state, config = setup(steps=6, eval_every=3, log_every=2, tensorboard=True, heartbeat=True,
                          checkpoint_dir=str(tmp_path))
    train(state, config)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/grad_norm", "train/samples_per_s", "val/loss", "val/acc"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("val/acc")] == [3, 6]
    assert _read(tmp_path / "heartbeat.json")["status"] == "finished"
    recorded = _read(tmp_path / "config.json")
    assert recorded["config"]["steps"] == 6 and recorded["versions"]["torch"] == torch.__version__


def test_evaluate_and_predict_in_dataset_order():
    state, config = setup()
    model = MLP()
    data = dataset(20, 5)
    loader = Loader(data, batch_size=6, shuffle=False, drop_last=False)
    preds = predict(state, make_predict_step(model), loader)
    model.load_state_dict(ft.state_dict(state))
    model.eval()
    assert torch.allclose(preds, model(data.tensors[0]), atol=1e-6)  # batch 6 vs 20: last-bit differences
    metrics = evaluate(state, config.eval_step, loader)
    expected = torch.nn.functional.cross_entropy(preds, data.tensors[1]).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shuffle=False"):
        predict(state, make_predict_step(model), Loader(data, batch_size=6))


def test_config_with_fields_from_text_runs():
    state, config = setup()
    config = TrainConfig.from_args(["steps=3", "eval_every=3"], **{
        k: getattr(config, k) for k in ("step", "data", "eval_step", "eval_data", "score", "hparams", "progress",
                                        "tensorboard", "log_every")})
    assert int(train(state, config).step) == 3


# ------------------------------------------------------------- host counters and async checkpoints
def _count_device_reads(monkeypatch):
    """Count int()/float()/bool()/item() of tensors (each one a device sync on CUDA)."""
    counts = [0]
    for name in ("__int__", "__float__", "__bool__", "__index__", "item"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            counts[0] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return counts


def test_the_loop_reads_device_values_per_log_not_per_micro_step(monkeypatch):
    state, config = setup(accumulate=2, steps=40, eval_every=None, eval_step=None, eval_data=None, score=None,
                          log_every=20)
    counts = _count_device_reads(monkeypatch)
    out = train(state, config)
    reads = counts[0]
    monkeypatch.undo()
    assert int(out.step) == 40 and int(out.micro_step) == 80
    # learning the accumulation period reads state.step a few times; then only logs and the end read the state
    assert reads < 40, f"{reads} reads of device values for 80 micro-steps"


def test_a_step_that_breaks_its_counting_pattern_is_refused_with_a_clear_error():
    state, config = setup(steps=12, eval_every=100, log_every=1)
    inner = config.step

    def stalls_at_call_5(s, batch):
        new = inner(s, batch)
        return new.replace(step=s.step) if int(s.micro_step) == 4 else new

    with pytest.raises(train_module.CounterMismatchError, match="state.step by 1 per call"):
        train(state, config.replace(step=stalls_at_call_5))


def test_an_irregular_step_is_read_after_every_call_and_behaves_as_before():
    state, config = setup(steps=10, eval_every=4, log_every=2)
    inner = config.step

    def double(s, batch):  # advances state.step by 2 per call: no pattern to predict
        new = inner(s, batch)
        return new.replace(step=new.step + 1)

    out = train(state, config.replace(step=double))
    assert (int(out.step), int(out.micro_step)) == (10, 5)


@pytest.mark.compile
def test_donated_step_with_async_checkpoints_saves_the_state_of_the_save_step(tmp_path, monkeypatch):
    from functrain.checkpoint import load
    from functrain.checkpoint import manager as manager_module

    torch.manual_seed(0)
    model = MLP()
    opt = ft.optim.adamw(0.05)
    state = ft.TrainState.create(model, opt, seed=1)
    donated = ft.donate(ft.make_train_step(model, lambda f, b: torch.nn.functional.cross_entropy(f(b[0]), b[1]),
                                           opt))
    calls, digests = [0], {}

    def step(s, batch):
        new = donated(s, batch)
        calls[0] += 1
        digests[calls[0]] = {f: tree_digest(getattr(new, f)) for f in ("params", "buffers", "opt_state")}
        return new

    real_save = manager_module.save

    def late_save(path, tree, *check):  # the writer starts only after the next donated step has run
        micro = int(os.path.basename(path).split("-")[1].split(".")[0])
        deadline = time.monotonic() + 20
        while micro < 6 and calls[0] <= micro and time.monotonic() < deadline:
            time.sleep(0.002)
        return real_save(path, tree, *check)

    monkeypatch.setattr(manager_module, "save", late_save)
    config = TrainConfig(steps=6, step=step, data=Loader(dataset(96, 0), batch_size=8, seed=3), progress=False,
                         tensorboard=False, log_every=0, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                         keep_last=10, async_checkpoint=True)
    out = train(state, config)
    assert int(out.step) == 6 and calls[0] == 6
    for micro in (2, 4, 6):
        plain = load(tmp_path / "checkpoints" / f"step-{micro:08d}.msgpack")
        assert int(plain["step"]) == micro
        for f in ("params", "buffers", "opt_state"):
            assert tree_digest(plain[f]) == digests[micro][f], (micro, f)
