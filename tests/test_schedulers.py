"""runtime.schedulers against diffusers' own schedulers, set up exactly as WanPipeline, FluxKontextPipeline and
SanaPipeline set them up, driven with the same model: v = f(x), a fixed random affine map, so a step's error
feeds into the next model output and UniPC's history matters. The plan is stepped on the host by the tests' own
numpy stepper (tests/scheduler_stepper.py): the table's algebra, which every step graph applies in the graph.

Tolerances (max |ours - diffusers| / max |diffusers| over every intermediate sample):
- FlowMatchEuler: bit-exact. The plan stores diffusers' float32 sigmas and dt, and x + dt * v rounds the same.
- UniPC, float64 (diffusers' sigmas promoted to float64, so it also computes in float64): <= 1e-13. Measured
  <= 2e-15 over orders 1-3 and 1-50 steps: the coefficient formulation is the same algebra, not an approximation.
- UniPC, float32: <= 2e-6. diffusers computes log-SNRs, h and expm1 in float32 from float32 sigmas (|lambda| up
  to 14, so h carries ~1e-6 absolute error); we compute them in float64 and round each coefficient once.
  Measured 5e-8 (2 steps) to 8.5e-7 (50 steps, order 3 with corrector disabled).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift as flux_calculate_shift
from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_timesteps as flux_retrieve_timesteps
from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps as sana_retrieve_timesteps
from scheduler_stepper import StepOrderError, Stepper, step_update

from metacanvas_deploy.mc_export.models.presets import _FLUX_EULER, _SANA_EULER, _UNIPC_FLOW
from metacanvas_deploy.runtime.errors import ManifestError, SchedulerConfigError, ShapeError
from metacanvas_deploy.runtime.schedulers import SchedulePlan, calculate_shift, make_plan

STEPS = (1, 2, 3, 4, 10, 50)
FLUX_SEQ_LENS = (16, 256, 1024, 4096, 6000)  # tiny 64x64, 256 = base, 1024 = 512px, 4096 = max, beyond max
UNIPC_TOL_F32 = 2e-6
UNIPC_TOL_F64 = 1e-13

_rng = np.random.default_rng(0)
_DIM = 256  # f acts on the last three axes of (1, 4, 8, 8)
_A = _rng.standard_normal((_DIM, _DIM)) / np.sqrt(_DIM)
_B = 0.3 * _rng.standard_normal(_DIM)
_X0 = _rng.standard_normal((1, 4, 8, 8))


def model(x: np.ndarray) -> np.ndarray:
    """The stand-in denoiser: a fixed affine map, evaluated in float64 and returned in x's dtype."""
    return (x.reshape(-1, _DIM).astype(np.float64) @ _A + _B).reshape(x.shape).astype(x.dtype)


def wan_scheduler(config: dict, n: int, float64: bool = False) -> UniPCMultistepScheduler:
    scheduler = UniPCMultistepScheduler.from_config(config)
    scheduler.set_timesteps(n, device="cpu")  # WanPipeline.__call__
    if float64:
        scheduler.sigmas = scheduler.sigmas.double()  # every scalar of its algebra then runs in float64
    return scheduler


def flux_scheduler(n: int, seq_len: int) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_FLUX_EULER)
    cfg = scheduler.config  # FluxKontextPipeline.__call__, step 5
    mu = flux_calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                              cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    flux_retrieve_timesteps(scheduler, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    return scheduler


def sana_scheduler(n: int) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_SANA_EULER)
    sana_retrieve_timesteps(scheduler, n, "cpu", None, None)  # SanaPipeline.__call__, step 4
    return scheduler


def drive(scheduler, plan: SchedulePlan, dtype=np.float32, edit=None) -> list[float]:
    """Runs both from the same x_0 with the same model; returns the relative error of every x_{i+1}.

    `edit(x)` (optional) modifies the sample in place between steps in both loops, as a pipeline that re-pins
    conditioning latents would.
    """
    assert np.array_equal(scheduler.timesteps.numpy().astype(np.float64), plan.timesteps)
    if scheduler.sigmas.dtype == torch.float32:
        assert np.array_equal(scheduler.sigmas.numpy().astype(np.float64), plan.sigmas)
    stepper = Stepper(plan)
    ref, ours, errors = torch.from_numpy(_X0.astype(dtype)), _X0.astype(dtype), []
    for i, t in enumerate(scheduler.timesteps):
        ref = scheduler.step(torch.from_numpy(model(ref.numpy())), t, ref, return_dict=False)[0]
        ours = stepper.step(i, model(ours), ours)
        assert ours.dtype == dtype and ours.shape == _X0.shape
        if edit is not None:
            edit(ref.numpy()), edit(ours)
        errors.append(float(np.abs(ref.numpy() - ours).max() / np.abs(ref.numpy()).max()))
    return errors


# ---------------------------------------------------------------- UniPC (Wan)

@pytest.mark.parametrize("n", STEPS)
def test_unipc_wan_preset_matches_diffusers(n):
    plan = make_plan(_UNIPC_FLOW, n)
    assert plan.kind == "unipc" and plan.history == 2 and plan.num_inference_steps == n
    assert all(t == int(t) for t in plan.timesteps)  # Wan's model is fed int64 timesteps
    assert max(drive(wan_scheduler(_UNIPC_FLOW, n), plan)) <= UNIPC_TOL_F32
    assert max(drive(wan_scheduler(_UNIPC_FLOW, n, float64=True), plan, np.float64)) <= UNIPC_TOL_F64


@pytest.mark.parametrize("order", (1, 2, 3))
@pytest.mark.parametrize("disable_corrector", ([], [0, 2]))
@pytest.mark.parametrize("n", (2, 3, 4, 10, 50))
def test_unipc_orders_and_disabled_corrector(order, disable_corrector, n):
    config = dict(_UNIPC_FLOW, solver_order=order, disable_corrector=disable_corrector)
    plan = make_plan(config, n)
    assert max(drive(wan_scheduler(config, n, float64=True), plan, np.float64)) <= UNIPC_TOL_F64
    assert max(drive(wan_scheduler(config, n), plan)) <= UNIPC_TOL_F32


def test_unipc_exact_when_the_pipeline_edits_the_sample_between_steps():
    """The corrector's state is the stored corrected sample, not one rebuilt from x_i: edits stay exact."""
    def pin_first_channel(x):
        x[:, 0] = 0.25

    plan = make_plan(_UNIPC_FLOW, 10)
    scheduler = wan_scheduler(_UNIPC_FLOW, 10, float64=True)
    assert max(drive(scheduler, plan, np.float64, edit=pin_first_channel)) <= UNIPC_TOL_F64


def test_unipc_layout_is_one_linear_map_per_step():
    """Step i = coefficients[i] @ [x_i, v_i, xc_{i-1}, m_{i-1}, m_{i-2}]; the last step returns the x0 prediction."""
    plan = make_plan(_UNIPC_FLOW, 4)
    coefficients = plan.coefficient_array()
    assert coefficients.shape == (4, 3, 5)
    np.testing.assert_array_equal(coefficients[0, 1], [1, 0, 0, 0, 0])  # no corrector at step 0
    np.testing.assert_array_equal(coefficients[:, 2, :2], np.stack([np.ones(4), -np.array(plan.sigmas[:4])], 1))
    # last step: sigma_N = 0 and order 1, so x_N = m_{N-1} = x - sigma_{N-1} v, the x0 prediction
    np.testing.assert_array_equal(coefficients[-1, 0], coefficients[-1, 2])
    x, v = _X0, model(_X0)
    x_next, last, m = step_update(coefficients[0], x, v, None, [None, None])
    np.testing.assert_array_equal(last, x)
    np.testing.assert_allclose(m, x - plan.sigmas[0] * v, rtol=0, atol=1e-15)
    assert np.abs(coefficients).max() <= 1.1  # no cancellation between large terms in float32


def test_bh1_is_refused_because_diffusers_itself_returns_nan():
    config = dict(_UNIPC_FLOW, solver_type="bh1")
    scheduler, x = wan_scheduler(config, 4), torch.from_numpy(_X0.astype(np.float32))
    for t in scheduler.timesteps:
        x = scheduler.step(torch.from_numpy(model(x.numpy())), t, x, return_dict=False)[0]
    assert torch.isnan(x).all()
    with pytest.raises(SchedulerConfigError, match="bh1.*NaN"):
        make_plan(config, 4)


# ---------------------------------------------------------------- FlowMatchEuler (FLUX, SANA)

@pytest.mark.parametrize("n", STEPS + (28,))
@pytest.mark.parametrize("seq_len", FLUX_SEQ_LENS)
def test_flux_dynamic_shift_is_bit_exact(n, seq_len):
    plan = make_plan(_FLUX_EULER, n, image_seq_len=seq_len)
    assert plan.kind == "euler" and plan.history == 0 and plan.image_seq_len == seq_len
    assert max(drive(flux_scheduler(n, seq_len), plan)) == 0.0


@pytest.mark.parametrize("n", STEPS + (20,))
def test_sana_static_shift_is_bit_exact(n):
    plan = make_plan(_SANA_EULER, n, image_seq_len=1024)  # ignored by a static shift
    assert plan.image_seq_len is None
    assert max(drive(sana_scheduler(n), plan)) == 0.0


def test_calculate_shift_is_fluxs():
    for seq_len in FLUX_SEQ_LENS:
        assert calculate_shift(seq_len) == flux_calculate_shift(seq_len)


def test_euler_is_stateless_and_does_not_alias_inputs():
    plan = make_plan(_SANA_EULER, 4)
    stepper, x = Stepper(plan), _X0.astype(np.float32)
    out3 = stepper.step(3, model(x), x)  # any order: no history
    out0 = stepper.step(0, model(x), x)
    assert out3 is not x and out0 is not x
    assert np.array_equal(out0, x + np.float32(plan.sigmas[1] - plan.sigmas[0]) * model(x))


# ---------------------------------------------------------------- plan JSON

@pytest.mark.parametrize("config, seq_len", [(_UNIPC_FLOW, None), (_FLUX_EULER, 1024), (_SANA_EULER, None)])
def test_plan_json_round_trip_is_exact(config, seq_len):
    plan = make_plan(config, 50, seq_len)
    back = SchedulePlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back == plan
    assert np.array_equal(back.coefficient_array(), plan.coefficient_array())
    assert make_plan(config, 50, seq_len) == plan  # deterministic


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("sigmas"), ""),
    (lambda d: d.update(kind="ddim"), "kind"),
    (lambda d: d.update(history=-1), "history"),
    (lambda d: d.update(image_seq_len=True), "image_seq_len"),
    (lambda d: d["sigmas"].pop(), "sigmas"),
    (lambda d: d["timesteps"].__setitem__(0, "999"), "timesteps"),
    (lambda d: d["coefficients"].pop(), "coefficients"),
    (lambda d: d["coefficients"][1][0].append(0.0), "coefficients[1]"),
    (lambda d: d["coefficients"][2][1].__setitem__(0, float("nan")), "coefficients[2]"),
])
def test_malformed_plan_json_is_a_manifest_error(mutate, field):
    d = make_plan(_UNIPC_FLOW, 4).to_json()
    mutate(d)
    with pytest.raises(ManifestError) as info:
        SchedulePlan.from_json(d)
    assert info.value.field == field


# ---------------------------------------------------------------- refused configs and misuse

@pytest.mark.parametrize("config, match", [
    (dict(_UNIPC_FLOW, _class_name="DDIMScheduler"), "_class_name"),
    ({"num_train_timesteps": 1000}, "_class_name"),
    (dict(_UNIPC_FLOW, lower_order_final=False), "lower_order_final"),
    (dict(_UNIPC_FLOW, use_flow_sigmas=False), "use_flow_sigmas"),
    (dict(_UNIPC_FLOW, prediction_type="epsilon"), "prediction_type"),
    (dict(_UNIPC_FLOW, thresholding=True), "thresholding"),
    (dict(_UNIPC_FLOW, use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(_UNIPC_FLOW, final_sigmas_type="sigma_min"), "final_sigmas_type"),
    (dict(_UNIPC_FLOW, solver_order=4), "solver_order"),
    (dict(_UNIPC_FLOW, disable_corrector=3), "disable_corrector"),
    (dict(_UNIPC_FLOW, flow_shift=0.0), "flow_shift"),
    (dict(_UNIPC_FLOW, clip_sample=True), "unknown"),
    (dict(_SANA_EULER, stochastic_sampling=True), "stochastic_sampling"),
    (dict(_SANA_EULER, invert_sigmas=True), "invert_sigmas"),
    (dict(_SANA_EULER, num_train_timesteps=0), "num_train_timesteps"),
    (dict(_FLUX_EULER, time_shift_type="linear"), "time_shift_type"),
    (dict(_FLUX_EULER, max_image_seq_len=256), "seq lens"),
])
def test_unsupported_configs_raise(config, match):
    with pytest.raises(SchedulerConfigError, match=match):
        make_plan(config, 4, 1024)


@pytest.mark.parametrize("steps", (0, -1, 2.0, True, None))
def test_bad_step_counts_raise(steps):
    with pytest.raises(SchedulerConfigError, match="num_inference_steps"):
        make_plan(_UNIPC_FLOW, steps)


@pytest.mark.parametrize("seq_len", (None, 0, 3.5))
def test_flux_needs_image_seq_len(seq_len):
    with pytest.raises(SchedulerConfigError, match="image_seq_len"):
        make_plan(_FLUX_EULER, 4, seq_len)


def test_real_configs_with_every_key_are_accepted():
    """Wan2.2's scheduler_config.json carries beta and spacing keys that flow sigmas ignore."""
    config = dict(_UNIPC_FLOW, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
                  timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                  dynamic_thresholding_ratio=0.995, sample_max_value=1.0, _diffusers_version="0.35.0")
    assert make_plan(config, 10) == make_plan(_UNIPC_FLOW, 10)
    flux = dict(_FLUX_EULER, _diffusers_version="0.34.0.dev0", invert_sigmas=False, shift_terminal=None,
                stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                use_exponential_sigmas=False, use_karras_sigmas=False)  # FLUX.1-Kontext-dev's config, all keys
    assert make_plan(flux, 28, 4096) == make_plan(_FLUX_EULER, 28, 4096)


def test_stepper_misuse_raises():
    stepper, x = Stepper(make_plan(_UNIPC_FLOW, 4)), _X0.astype(np.float32)
    with pytest.raises(StepOrderError, match="history is at step 0"):
        stepper.step(1, x, x)
    with pytest.raises(StepOrderError, match="in \\[0, 4\\)"):
        stepper.step(4, x, x)
    with pytest.raises(ShapeError, match="differs"):
        stepper.step(0, x[..., :4], x)
    with pytest.raises(ShapeError, match="float"):
        stepper.step(0, x.astype(np.int32), x.astype(np.int32))
    stepper.step(0, x, x)
    with pytest.raises(ShapeError, match="previous step"):
        stepper.step(1, x[..., :4], x[..., :4])
    stepper.reset()
    with pytest.raises(StepOrderError):
        step_update(make_plan(_UNIPC_FLOW, 4).coefficient_array()[1], x, x, None, [None, None])


def test_step_feeds_are_what_every_step_graph_takes():
    """`SchedulePlan.step_feeds(i)`: the one place the per-step inputs are made (runtime and build alike)."""
    plan = make_plan(_UNIPC_FLOW, 5)
    for i in range(5):
        feeds = plan.step_feeds(i)
        assert feeds["timestep"].dtype == feeds["coefficients"].dtype == np.float32
        assert feeds["timestep"].shape == (1,) and feeds["timestep"][0] == np.float32(plan.timesteps[i])
        assert np.array_equal(feeds["coefficients"], plan.coefficient_array()[i].astype(np.float32))
        assert feeds["coefficients"].shape == (3, 3 + plan.history)


def test_reset_replays_identically():
    plan, x = make_plan(_UNIPC_FLOW, 10), _X0.astype(np.float32)
    stepper = Stepper(plan)
    runs = []
    for _ in range(2):
        stepper.reset()
        y = x
        for i in range(10):
            y = stepper.step(i, model(y), y)
        runs.append(y)
    assert np.array_equal(*runs)


def test_runtime_schedulers_import_only_numpy_and_stdlib():
    path = Path(__file__).resolve().parents[1] / "runtime" / "schedulers.py"
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules <= {"__future__", "math", "collections", "dataclasses", "numpy", "metacanvas_deploy"}, modules
    code = "import sys, metacanvas_deploy.runtime.schedulers; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=path.parents[1])
    assert out.stdout.strip() == "[]"
