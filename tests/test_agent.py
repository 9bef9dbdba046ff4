"""The training loop, in process: what acts, what learns from what, what an update writes back, when θ⁻ syncs.

Each test fits a real DQN agent with Lightning on CartPole for a few hundred env steps and watches
it through spies that record and pass everything on unchanged.
"""

import copy
import csv
import functools
import math
import random
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from pytorch_lightning.loggers import CSVLogger
from torch.func import functional_call

from rl_pipeline.agents.evaluation import Score
from rl_pipeline.agents.noisy import noisy_layers, resample_noise
from rl_pipeline.envs.make import layers, make_vector_env
from rl_pipeline.envs.transforms import ObservationStatistics
from rl_pipeline.run.build import build_agent
from rl_pipeline.run.checkpoints import AtomicCheckpointIO, read_checkpoint
from rl_pipeline.run.config import check_settings
from rl_pipeline.run.export import export_best
from rl_pipeline.run.train import build_callbacks, build_trainer, fit

# 8 iterations of 128 env steps (4 envs x 32); updates (3 per iteration) start once 256 steps are collected.
SMALL = (
    "+experiment=dqn",
    "trainer.max_env_steps=1024",
    "collector.env_steps_per_iteration=128",
    "collector.learning_starts=256",
    "exploration.epsilon_fraction=0",  # ε = epsilon_end from the start: the same ε whatever the budget
    "agent.updates_per_iteration=3",
    "buffer.batch_size=32",
    "trainer.eval_interval_env_steps=512",
    "trainer.eval_episodes=3",
    "trainer.stop_when_solved=false",
    "trainer.lightning.enable_progress_bar=false",
)
UPDATES = 7 * 3  # iterations 2..8, 3 updates each
NOISY = ("network.noisy=true", "exploration=noisy", "~exploration.epsilon_end", "~exploration.epsilon_fraction")


def parameters(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in network.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def fit_agent(tmp_path, *overrides: str, before_fit=lambda agent: None):
    """As train() fits: the same parts, callbacks and seeding; a CSV logger in place of MLflow's."""
    cfg = compose_config(*SMALL, *overrides, f"paths.output_dir={tmp_path}")
    check_settings(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    agent = build_agent(cfg)
    before_fit(agent)
    trainer = build_trainer(cfg, agent, list(build_callbacks(cfg, tmp_path / "checkpoints").values()))
    trainer.logger = CSVLogger(tmp_path, name="log")
    fit(trainer, agent, None, tmp_path / "checkpoints" / "last.ckpt")
    return agent, trainer


def logged_rows(trainer) -> list[dict]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def record_updates(agent, records: list) -> None:
    """Spy on the agent's learn(): the networks before and after each update, its batch, the loss's output."""
    learn, loss, outputs = agent.learn, agent.loss, []

    def recording_loss(online, target, batch):
        outputs.append(loss(online, target, batch))
        return outputs[-1]

    def recording(batch):
        before = SimpleNamespace(online=parameters(agent.network), target=parameters(agent.target_network))
        update = learn(batch)
        records.append(SimpleNamespace(
            before=before, online=parameters(agent.network), target=parameters(agent.target_network),
            batch=batch, out=outputs[-1], loss=loss, update=update, num_updates=agent.num_updates,
            env_steps=agent.env_steps,
            priorities=agent.buffer.tree[batch.indices.numpy()].copy() if hasattr(agent.buffer, "tree") else None,
        ))
        return update

    agent.loss, agent.learn = recording_loss, recording


def test_updates_per_iteration_after_warm_up_and_none_before(tmp_path):
    records = []
    agent, _ = fit_agent(tmp_path, before_fit=lambda a: record_updates(a, records))
    assert agent.num_updates == len(records) == UPDATES
    assert [r.num_updates for r in records] == list(range(1, UPDATES + 1))
    # Every update steps the online network; none touches it in place otherwise.
    for r in records:
        assert not same(r.before.online, r.online)


@pytest.mark.parametrize("interval", [1, 4, 1000])
def test_the_target_network_is_a_hard_copy_every_interval_updates_and_untouched_between(tmp_path, interval):
    records, initial = [], {}

    def before_fit(agent):
        initial.update(online=parameters(agent.network), target=parameters(agent.target_network))
        record_updates(agent, records)

    agent, _ = fit_agent(tmp_path, f"agent.target_sync_interval_updates={interval}", before_fit=before_fit)
    assert same(initial["online"], initial["target"]), "θ⁻ starts as a copy of θ"
    for r in records:
        if r.num_updates % interval == 0:
            assert same(r.target, r.online), f"update {r.num_updates}: θ⁻ should now equal θ"
        else:
            assert same(r.target, r.before.target), f"update {r.num_updates}: θ⁻ should be untouched"
    synced = sum(r.num_updates % interval == 0 for r in records)
    assert synced == UPDATES // interval


def test_polyak_averaging_moves_the_target_by_tau_at_each_sync(tmp_path):
    records = []
    fit_agent(tmp_path, "agent.target_sync_interval_updates=2", "agent.target_sync_tau=0.25",
               before_fit=lambda a: record_updates(a, records))
    for r in records:
        for name, target in r.target.items():
            if r.num_updates % 2 == 0:
                expected = r.before.target[name] + 0.25 * (r.online[name] - r.before.target[name])
                torch.testing.assert_close(target, expected)
            else:
                assert torch.equal(target, r.before.target[name])


@pytest.mark.parametrize("double_dqn", [False, True])
def test_each_update_learns_from_the_online_network_against_the_target_network(tmp_path, double_dqn):
    # The TD errors an update reports, recomputed from the parameters before it: y from θ⁻ (and θ for
    # double DQN's argmax), Q(s, a) from θ. A loss fed the wrong network, or after the step, differs.
    records = []
    agent, _ = fit_agent(tmp_path, "agent.target_sync_interval_updates=1000", f"loss.double_dqn={double_dqn}",
                           before_fit=lambda a: record_updates(a, records))
    gamma = records[0].loss.gamma
    for r in records:
        b = r.batch
        q_next_target = functional_call(agent.target_network, r.before.target, (b.next_observations,))
        if double_dqn:
            q_next_online = functional_call(agent.network, r.before.online, (b.next_observations,))
            next_value = q_next_target.gather(1, q_next_online.argmax(1, keepdim=True)).squeeze(1)
        else:
            next_value = q_next_target.max(1).values
        y = b.rewards + gamma**b.steps * (1 - b.terminated) * next_value
        q_taken = functional_call(agent.network, r.before.online, (b.observations,)).gather(
            1, b.actions.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(r.out.errors, (y - q_taken).detach())
    assert not same(records[-1].before.online, records[-1].before.target), "θ and θ⁻ apart, or this proves nothing"


def test_each_update_writes_its_td_errors_back_as_priorities(tmp_path):
    records = []
    agent, _ = fit_agent(tmp_path, "buffer=prioritized", before_fit=lambda a: record_updates(a, records))
    buffer = agent.buffer
    for r in records:
        expected = (r.out.errors.abs().double().numpy() + buffer.epsilon) ** buffer.alpha
        last_write = {int(i): p for i, p in zip(r.batch.indices, expected)}  # a repeated index: its last sample
        np.testing.assert_allclose(r.priorities, [last_write[int(i)] for i in r.batch.indices])
        assert not np.allclose(r.priorities, buffer.max_priority), "priorities unchanged since their insertion"


def test_the_agent_acts_greedily_on_the_online_network_once_warmed_up(tmp_path):
    acting = []  # per act step after the warm-up: the actions taken, and the greedy ones of θ and of θ⁻ then

    def before_fit(agent):
        act = agent.act

        def recording(policy, observations):
            actions = act(policy, observations)
            if not agent.collector.warming_up:
                with torch.no_grad():
                    greedy = [net(torch.as_tensor(observations)).argmax(1).numpy()
                              for net in (agent.network, agent.target_network)]
                acting.append((actions, *greedy))
            return actions

        agent.act = recording

    fit_agent(tmp_path, "agent.target_sync_interval_updates=1000", "exploration.epsilon_end=0", before_fit=before_fit)
    assert len(acting) == (1024 - 256) // 4
    for acted, online, _ in acting:
        np.testing.assert_array_equal(acted, online)
    assert any((acted != target).any() for acted, _, target in acting), "θ and θ⁻ apart, or this proves nothing"


class RecordingEvaluator:
    """Passes every call to the agent's evaluator; keeps what it was given and what it returned."""

    def __init__(self, agent, probe: torch.Tensor):
        self.evaluator, self.agent, self.probe, self.calls = agent.evaluator, agent, probe, []

    def __getattr__(self, name):
        return getattr(self.evaluator, name)

    @torch.no_grad()
    def __call__(self, policy):
        returns = self.evaluator(policy)
        networks = (policy, self.agent.network, self.agent.target_network)
        self.calls.append(SimpleNamespace(
            q_values=[net(self.probe) for net in networks], returns=returns, env_steps=self.agent.env_steps
        ))
        return returns


def test_evaluation_scores_the_online_policy_and_logs_its_score_at_its_env_step(tmp_path):
    probe = torch.as_tensor(make_vector_env("CartPole-v1", num_envs=8).reset(seed=5)[0])
    recorders = []

    def before_fit(agent):
        agent.evaluator = RecordingEvaluator(agent, probe)
        recorders.append(agent.evaluator)

    _, trainer = fit_agent(tmp_path, "agent.target_sync_interval_updates=1000", before_fit=before_fit)
    calls = recorders[0].calls
    evals = [row for row in logged_rows(trainer) if row.get("eval/return_mean")]
    assert [int(row["step"]) for row in evals] == [512, 1024] and len(calls) == 2
    for row, call in zip(evals, calls):
        evaluated, online, target = call.q_values
        torch.testing.assert_close(evaluated, online)
        assert not torch.allclose(evaluated, target), "θ and θ⁻ apart, or this proves nothing"
        expected = Score.of(call.returns).metrics("eval")
        assert {key: float(row[key]) for key in expected} == expected


def record_collections(agent, iterations: list) -> None:
    """Spy on Collector.collect: the env steps each iteration asked for and the episodes it saw end."""
    collect = agent.collector.collect

    def recording(act, store, env_steps):
        stats = collect(act, store, env_steps)
        iterations.append(SimpleNamespace(asked=env_steps, stats=stats, env_steps=agent.env_steps))
        return stats

    agent.collector.collect = recording


def test_each_iteration_logs_what_it_measured_at_its_env_step_in_float64(tmp_path):
    iterations, updates = [], []

    def before_fit(agent):
        record_collections(agent, iterations)
        record_updates(agent, updates)

    agent, trainer = fit_agent(tmp_path, "exploration.epsilon_end=0.3", "optimizer.lr=0.0007", before_fit=before_fit)
    rows = [row for row in logged_rows(trainer) if row.get("train/epsilon")]
    assert [int(row["step"]) for row in rows] == list(range(128, 1025, 128))
    for i, (row, iteration) in enumerate(zip(rows, iterations, strict=True)):
        stats = iteration.stats
        assert float(row["train/epsilon"]) == pytest.approx(1.0 if i < 1 else 0.3)  # warm-up: uniformly random
        assert float(row["train/lr"]) == 0.0007
        if stats.episode_returns:  # exactly: a float32 on the way would change the digits
            assert float(row["train/episode_return"]) == np.mean(stats.episode_returns)
            assert float(row["train/episode_length"]) == np.mean(stats.episode_lengths)
        its_updates = [u for u in updates if u.env_steps == iteration.env_steps]
        assert len(its_updates) == (3 if i >= 1 else 0), "updates once warm-up is over"
        for key in ("train/loss", "train/q_mean", "train/grad_norm", "perf/env_steps_per_sec"):
            assert bool(row[key]) == bool(its_updates), f"{key}: logged for an iteration that updated, and only then"
        if its_updates:
            assert float(row["train/loss"]) == torch.stack([u.update.loss for u in its_updates]).double().mean().item()
            assert float(row["train/grad_norm"]) == torch.stack([u.update.grad_norm for u in its_updates]).double().mean().item()
    assert sum(len(it.stats.episode_returns) for it in iterations) > 8, "episodes end in most iterations"


@pytest.mark.parametrize(
    ("max_env_steps", "eval_interval", "evaluated_at"),
    [(1000, 300, [300, 600, 900, 1000]), (1024, 512, [512, 1024]), (600, 2000, [600])],
)
def test_evaluations_fall_exactly_every_interval_and_the_budget_is_spent_exactly(
    tmp_path, max_env_steps, eval_interval, evaluated_at
):
    iterations, recorders = [], []

    def before_fit(agent):
        record_collections(agent, iterations)
        agent.evaluator = RecordingEvaluator(agent, probe=torch.zeros(1, 4))
        recorders.append(agent.evaluator)

    agent, trainer = fit_agent(
        tmp_path, f"trainer.max_env_steps={max_env_steps}", f"trainer.eval_interval_env_steps={eval_interval}",
        before_fit=before_fit,
    )
    evaluated = [call.env_steps for call in recorders[0].calls]
    assert evaluated == evaluated_at
    assert agent.env_steps == max_env_steps
    assert all(it.asked <= 128 for it in iterations), "never more than collector.env_steps_per_iteration"
    assert [it.env_steps for it in iterations if it.asked < 128] == sorted(set(evaluated_at) - set(range(0, 10**6, 128)))
    evals = [int(row["step"]) for row in logged_rows(trainer) if row.get("eval/return_mean")]
    assert evals == evaluated_at


def test_gradients_are_clipped_to_max_grad_norm(tmp_path):
    norms = {}

    def record_grad_norms(key):
        def before_fit(agent):
            def hook(optimizer, args, kwargs):
                grads = [p.grad for p in agent.network.parameters()]
                norms.setdefault(key, []).append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            agent.optimizer.register_step_pre_hook(hook)
        return before_fit

    fit_agent(tmp_path / "free", before_fit=record_grad_norms("free"))
    fit_agent(tmp_path / "clipped", "agent.max_grad_norm=0.05", before_fit=record_grad_norms("clipped"))
    assert len(norms["clipped"]) == UPDATES
    assert max(norms["clipped"]) <= 0.05 * (1 + 1e-5)
    assert max(norms["free"]) > 0.05, "gradients above the clip, or this proves nothing"


def test_normalized_observations_are_stored_raw_and_normalized_with_the_statistics_of_each_update(tmp_path):
    last_update = {}

    def before_fit(agent):
        prepared, inputs = agent.prepared, []
        agent.network.register_forward_pre_hook(lambda net, args: inputs.append(args[0]))

        def recording(batch):
            inputs.clear()  # from here on: the network's inputs in this batch's update, and in what acts after it
            last_update.update(batch=batch, inputs=inputs)  # the batch as the buffer gave it
            return prepared(batch)

        agent.prepared = recording

    agent, _ = fit_agent(tmp_path, "transforms=normalize_obs", before_fit=before_fit)
    # The first stored transitions start from the training envs' first (seeded) observations, raw.
    first = make_vector_env("CartPole-v1", num_envs=4).reset(seed=0)[0]
    np.testing.assert_array_equal(agent.buffer.storage.observations[:4].numpy(), first)
    stats = next(layer for layer in layers(agent.collector.env) if isinstance(layer, ObservationStatistics)).obs_rms
    assert stats.count > 1024  # every observation since the first reset
    # The last update's Q(s, a) took its batch normalized with the statistics after the last collection.
    raw = last_update["batch"].observations
    mean, var = (torch.as_tensor(x, dtype=torch.float32) for x in (stats.mean, stats.var))
    normalized = (raw - mean) / torch.sqrt(var + 1e-8)
    assert any(torch.allclose(x, normalized, atol=1e-6) for x in last_update["inputs"] if x.shape == raw.shape)
    assert not torch.allclose(raw, normalized, atol=0.1), "normalizing changes the batch, or this proves nothing"


def stopped_at(tmp_path, solved_return: float) -> tuple[int, bool]:
    """The env step a run with this threshold stopped at, and whether its best checkpoint counts as solved."""
    agent, trainer = fit_agent(
        tmp_path, "trainer.stop_when_solved=true", f"trainer.solved_return={solved_return!r}",
        "trainer.solved_confirm_episodes=0",
    )
    return agent.env_steps, agent.evaluator.solved(float(trainer.checkpoint_callback.best_model_score))


def test_a_run_stops_and_is_solved_when_its_lower_bound_equals_the_threshold(tmp_path):
    agent, trainer = fit_agent(tmp_path / "first", "trainer.max_env_steps=512")
    bound = trainer.callback_metrics["eval/return_lower_bound"]
    assert bound.dtype == torch.float64  # as measured, so that ">=" means what it says
    # The same run with the threshold at exactly that bound stops there, solved; a hair above, it goes on.
    assert stopped_at(tmp_path / "at", bound.item()) == (512, True)
    assert stopped_at(tmp_path / "above", math.nextafter(bound.item(), math.inf))[0] == 1024


def test_a_run_that_goes_on_after_solving_records_the_first_evaluation_that_solved(tmp_path):
    # Every evaluation passes a threshold of -1000; with stop_when_solved=false the run goes on to its budget.
    agent, _ = fit_agent(tmp_path, "trainer.solved_return=-1000", "trainer.solved_confirm_episodes=3")
    assert (agent.solved_env_steps, agent.env_steps) == (512, 1024)
    restored, _ = fit_agent(tmp_path / "restored", "trainer.max_env_steps=512")
    assert restored.solved_env_steps is None  # CartPole's 475 is out of reach in 512 env steps
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    restored.on_load_checkpoint(checkpoint)
    assert restored.solved_env_steps == 512  # a resumed export logs it too


def build_small_agent(tmp_path, *overrides: str):
    cfg = compose_config(*SMALL, *overrides, f"paths.output_dir={tmp_path}")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_agent(cfg)


def next_iteration(agent) -> tuple:
    """What the agent does next: the steps it collects (acting as in training, noise and all), a batch it samples,
    its three RNG streams and the noise its noisy layers hold then."""
    collected = []
    agent.train()
    agent.collector.collect(functools.partial(agent.act, agent.policy), collected.append, 128)
    batch = agent.buffer.sample(agent.env_steps)
    noise = [layer.weight_epsilon.clone() for layer in noisy_layers(agent)]
    return collected, batch, torch.rand(3), np.random.rand(3), random.random(), *noise


@pytest.mark.parametrize("overrides", [(), NOISY], ids=["epsilon_greedy", "noisy"])
def test_an_agent_restored_from_its_checkpoint_goes_on_exactly_as_the_one_that_saved_it(tmp_path, overrides):
    trained, _ = fit_agent(tmp_path / "trained", *overrides)  # last.ckpt is written as training ends
    checkpoint = read_checkpoint(tmp_path / "trained" / "checkpoints" / "last.ckpt")
    counts = (trained.env_steps, trained.num_updates, trained.buffer.size)
    expected_collected, expected_batch, *expected_draws = next_iteration(trained)

    # Another seed: nothing matches by chance (noisy layers included: other weights, other noise).
    restored = build_small_agent(tmp_path / "restored", *overrides, "seed=1")
    restored.load_state_dict(checkpoint["state_dict"])
    restored.on_load_checkpoint(checkpoint)
    restored.on_train_batch_start(None, 0)  # where a resuming Lightning restores the RNG streams
    assert (restored.env_steps, restored.num_updates, restored.buffer.size) == counts and counts[2] > 900
    # The same buffer, envs and RNG streams: the same next transitions, batch and draws, to the bit.
    collected, batch, *draws = next_iteration(restored)
    for got, expected in zip(collected, expected_collected, strict=True):
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    for name in ("indices", "observations", "actions", "rewards", "next_observations"):
        torch.testing.assert_close(getattr(batch, name), getattr(expected_batch, name), rtol=0, atol=0)
    for got, expected in zip(draws, expected_draws, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert len(draws) == 3 + 2 * 3 * len(overrides) // len(NOISY)  # three noisy layers each in θ and θ⁻


@pytest.mark.parametrize("overrides", [(), NOISY, ("loss=c51",)], ids=["dqn", "noisy", "c51"])
def test_export_logs_the_best_checkpoints_weights_not_the_final_ones(tmp_path, tracking_uri, overrides):
    agent = build_small_agent(tmp_path, *overrides)
    best = {name: weights + 0.5 if weights.is_floating_point() else weights
            for name, weights in agent.state_dict().items()}
    path = tmp_path / "best-step=512.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": best, "env_steps": 512}, path)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run():
        policy, model_id, env_steps = export_best(agent, str(path))
    logged = mlflow.pytorch.load_model(f"models:/{model_id}")
    assert env_steps == 512
    observations = torch.randn(8, 4)
    for exported in (policy, logged):  # what is tested, and what is stored
        weights = {f"network.{name.removeprefix('1.')}": w for name, w in exported.named_parameters()}
        assert weights.keys() and all(torch.equal(w, best[name]) for name, w in weights.items())
        # Raw observations to Q-values, on the mean weights of noisy layers, whatever noise they hold
        resample_noise(exported)
        q_values = agent.loss.q_values(copy.deepcopy(agent.network).eval()(observations))
        torch.testing.assert_close(exported(observations), q_values, rtol=0, atol=0)


def test_noisy_nets_draw_fresh_noise_for_every_update_and_every_act_step_and_none_in_evaluation(tmp_path):
    def noise(network):
        return torch.cat([layer.weight_epsilon.flatten() for layer in noisy_layers(network)]).clone()

    at_updates, at_acts, at_evaluations = [], [], []

    def before_fit(agent):
        loss, act = agent.loss, agent.act

        def recording_loss(online, target, batch):
            at_updates.append((noise(online), noise(target)))
            return loss(online, target, batch)

        def recording_act(policy, observations):
            actions = act(policy, observations)
            if not agent.collector.warming_up:
                at_acts.append(noise(agent.network))
            return actions

        class WatchingEvaluator(RecordingEvaluator):
            def __call__(self, policy):
                before = noise(agent.network)
                mean_network = copy.deepcopy(agent.network).eval()
                probe = torch.randn(16, 4)
                with torch.no_grad():
                    acted_on = policy(probe), mean_network(probe)
                returns = super().__call__(policy)
                at_evaluations.append((agent.network.training, before, noise(agent.network), *acted_on))
                return returns

        agent.loss, agent.act = recording_loss, recording_act
        agent.evaluator = WatchingEvaluator(agent, probe=torch.zeros(1, 4))

    fit_agent(tmp_path, *NOISY, before_fit=before_fit)
    assert len(at_updates) == UPDATES and len(at_acts) == (1024 - 256) // 4
    for (online, target), (next_online, next_target) in zip(at_updates, at_updates[1:]):
        assert not torch.equal(online, next_online) and not torch.equal(target, next_target)
    assert not torch.equal(at_updates[0][0], at_updates[0][1]), "θ and θ⁻ draw noise of their own"
    assert all(not torch.equal(a, b) for a, b in zip(at_acts, at_acts[1:]))
    assert len(at_evaluations) == 2
    for training, before, after, evaluated, mean in at_evaluations:
        assert not training and torch.equal(before, after)  # evaluated in eval mode, its noise untouched
        torch.testing.assert_close(evaluated, mean, rtol=0, atol=0)  # on the mean weights
