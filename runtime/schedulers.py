"""Denoising schedules in numpy: diffusers' UniPC (Wan) and FlowMatchEuler (FLUX, SANA), no torch.

A schedule is split in two halves that meet through the bundle manifest:

* `make_plan` (build time, or at run time for a step count the bundle lacks) turns a diffusers scheduler config
  into a `SchedulePlan`: the timesteps the pipeline feeds the model, the sigmas, and one coefficient table that
  makes every step a fixed linear combination. UniPC's coefficients depend only on the sigmas, never on the data,
  so they are computed here once, in float64, and stored as plain JSON.
* every denoise-step graph applies the table (`mc_export.components.denoise.scheduler_update`): elementwise
  multiply-adds, nothing else; `SchedulePlan.step_feeds` is what the runtime feeds it at each step.

Step i is a linear map ``outputs = coefficients[i] @ inputs`` (shape (3, 3 + K), K = the solver's history):

    inputs  (columns): x_i          sample the model saw at step i
                       v_i          raw model output (flow velocity) at step i
                       xc_{i-1}     previous corrected sample ("last sample"; UniPC's corrector state)
                       m_{i-1} .. m_{i-K}   previous converted model outputs (x0 predictions)
    outputs (rows):    x_{i+1}      the next sample (what the pipeline passes to the model next)
                       xc_i         this step's corrected sample (state for step i + 1)
                       m_i          this step's converted model output x_i - sigma_i * v_i (state)

FlowMatchEuler is the special case K = 0 with one non-zero row: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i``.
Keeping xc_{i-1} as state (instead of rebuilding it from x_i) keeps the map exact even when a pipeline edits the
sample between steps (re-pinning known latents): diffusers' corrector reads its stored last sample too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metacanvas_deploy.runtime.errors import ManifestError, SchedulerConfigError

ROW_NEXT, ROW_LAST, ROW_M = 0, 1, 2  # rows of a step's coefficient matrix
COL_X, COL_V, COL_LAST, COL_HISTORY = 0, 1, 2, 3  # columns; history m_{i-1-j} sits in column COL_HISTORY + j
KINDS = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler"}

# diffusers' defaults for every option that changes the schedule, and the options that have no effect on the
# path we support (betas, thresholding ranges, spacing: flow sigmas overwrite them all).
_UNIPC_DEFAULTS = dict(
    num_train_timesteps=1000, solver_order=2, prediction_type="epsilon", thresholding=False, predict_x0=True,
    solver_type="bh2", lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
    final_sigmas_type="zero", use_dynamic_shifting=False, shift_terminal=None)
_UNIPC_INERT = {"beta_start", "beta_end", "beta_schedule", "trained_betas", "dynamic_thresholding_ratio",
                "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "time_shift_type",
                "sigma_min", "sigma_max"}
_COMMON_REQUIRED = {  # option: (value we support, why another value is refused)
    "shift_terminal": (None, "terminal stretching is not implemented"),
    **{k: (False, "only the shifted linear (flow) sigma schedule is implemented")
       for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")},
}
_UNIPC_REQUIRED = {
    "use_flow_sigmas": (True, "Wan's flow-matching UniPC is the only UniPC variant the runtime implements"),
    "prediction_type": ("flow_prediction", "flow sigmas come with a flow-matching (velocity) model"),
    "predict_x0": (True, "the runtime implements the data-prediction (x0) form of UniPC"),
    "solver_type": ("bh2", "with 'bh1' and flow sigmas B(h) = h is -inf at the last step (sigma 0) and diffusers "
                           "itself returns NaN there; use 'bh2' (Wan's default)"),
    "lower_order_final": (True, "without it the last step runs order 2 at sigma 0 (infinite log-SNR) and diverges"),
    "final_sigmas_type": ("zero", "'sigma_min' with flow sigmas makes the last step's h = 0 (0/0 in diffusers)"),
    "thresholding": (False, "dynamic thresholding depends on the data; it has no place in a precomputed plan"),
    "solver_p": (None, "an external predictor scheduler cannot be stored in a plan"),
    "use_dynamic_shifting": (False, "Wan uses a static flow_shift"),
    **_COMMON_REQUIRED,
}
_EULER_DEFAULTS = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential",
    stochastic_sampling=False)
_EULER_REQUIRED = {
    "invert_sigmas": (False, "inverted sigmas are not implemented"),
    "stochastic_sampling": (False, "stochastic sampling draws noise inside the step; the plan is deterministic"),
    "time_shift_type": ("exponential", "FLUX's dynamic shifting is the exponential one"),
    **_COMMON_REQUIRED,
}


@dataclass(frozen=True)
class SchedulePlan:
    """Everything the runtime needs to run one denoising schedule; JSON-serialisable, exact in float64.

    kind: "unipc" or "euler" (informational; a step only reads `coefficients`).
    timesteps: (N,) the scheduler's timesteps t_i in [0, num_train_timesteps], as the pipeline's loop hands
        them on (UniPC: whole numbers, diffusers casts them to int64; Euler: float32 values). Any rescaling the
        backbone's pipeline does (FLUX feeds t / 1000) belongs to the backbone, not here.
    sigmas: (N + 1,) noise levels, the float32 values diffusers steps with, last one 0.
    coefficients: (N, 3, 3 + history) per-step linear maps, rows/columns as in the module docstring.
    history: K, the previous converted model outputs a step reads (solver_order for UniPC, 0 for Euler).
    image_seq_len: the packed image tokens a dynamically shifted (FLUX) schedule was made for, else None.
    """

    kind: str
    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    coefficients: tuple[tuple[tuple[float, ...], ...], ...]
    history: int
    image_seq_len: int | None = None

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def coefficient_array(self) -> np.ndarray:
        """The coefficient table as float64, shape (N, 3, 3 + history)."""
        return np.asarray(self.coefficients, dtype=np.float64).reshape(len(self.timesteps), 3, 3 + self.history)

    def step_feeds(self, i: int) -> dict[str, np.ndarray]:
        """What a denoise-step graph takes at step ``i`` besides the latents and the multistep state, as the
        runtime feeds it: ``timestep`` (1,) and ``coefficients`` (3, 3 + history), both float32."""
        return {"timestep": np.array([self.timesteps[i]], np.float32),
                "coefficients": self.coefficient_array()[i].astype(np.float32)}

    def to_json(self) -> dict:
        """Plain lists and Python floats: `json.dumps` writes repr(float), which reads back bit-exact."""
        return dict(kind=self.kind, timesteps=list(self.timesteps), sigmas=list(self.sigmas),
                    coefficients=[[list(row) for row in step] for step in self.coefficients],
                    history=self.history, image_seq_len=self.image_seq_len)

    @classmethod
    def from_json(cls, d: dict) -> SchedulePlan:
        """Inverse of `to_json`; raises `ManifestError` (field = the offending key) on anything malformed."""
        keys = ["coefficients", "history", "image_seq_len", "kind", "sigmas", "timesteps"]
        if not isinstance(d, dict) or sorted(d) != keys:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ManifestError(f"a schedule plan has keys {keys}, got {got}; rebuild the bundle")
        if d["kind"] not in KINDS.values():
            raise ManifestError(f"plan kind must be one of {sorted(KINDS.values())}, got {d['kind']!r}", "kind")
        history, seq = d["history"], d["image_seq_len"]
        if not _is_int(history) or history < 0:
            raise ManifestError(f"history must be an int >= 0, got {history!r}", "history")
        if seq is not None and (not _is_int(seq) or seq < 1):
            raise ManifestError(f"image_seq_len must be null or an int >= 1, got {seq!r}", "image_seq_len")
        timesteps, sigmas = _floats(d["timesteps"], "timesteps"), _floats(d["sigmas"], "sigmas")
        n = len(timesteps)
        if n < 1 or len(sigmas) != n + 1:
            raise ManifestError(f"need N >= 1 timesteps and N + 1 sigmas, got {n} and {len(sigmas)}", "sigmas")
        steps = d["coefficients"]
        if not isinstance(steps, list) or len(steps) != n or any(
                not isinstance(s, list) or len(s) != 3 for s in steps):
            raise ManifestError(f"coefficients must be {n} lists of 3 rows", "coefficients")
        coefficients = tuple(tuple(_floats(row, f"coefficients[{i}]", 3 + history) for row in s)
                             for i, s in enumerate(steps))
        return cls(d["kind"], timesteps, sigmas, coefficients, history, seq)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _floats(values, field: str, length: int | None = None) -> tuple[float, ...]:
    if not isinstance(values, list) or (length is not None and len(values) != length) or not all(
            _is_number(v) for v in values):
        want = f"a list of {length} finite numbers" if length is not None else "a list of finite numbers"
        raise ManifestError(f"{field} must be {want}; rebuild the bundle", field)
    return tuple(float(v) for v in values)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift mu: linear in the packed image token count (diffusers' formula)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def make_plan(config: dict, num_inference_steps: int, image_seq_len: int | None = None) -> SchedulePlan:
    """The plan diffusers' pipeline would step through for this scheduler config.

    config: a diffusers scheduler config dict with "_class_name" UniPCMultistepScheduler (set up as
        WanPipeline does: `set_timesteps(N)`) or FlowMatchEulerDiscreteScheduler (static shift: SanaPipeline's
        `set_timesteps(N)`; `use_dynamic_shifting`: FluxKontextPipeline's sigmas linspace(1, 1/N, N) and mu).
    image_seq_len: packed target-image tokens, (H / 16) * (W / 16) for FLUX (context-image tokens excluded);
        required by dynamic shifting, ignored otherwise.
    Raises SchedulerConfigError for anything it cannot reproduce exactly.
    """
    if not isinstance(config, dict) or config.get("_class_name") not in KINDS:
        got = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise SchedulerConfigError(f"scheduler _class_name must be one of {sorted(KINDS)}, got {got!r}; the "
                                   "runtime implements only these two schedulers")
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise SchedulerConfigError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if KINDS[config["_class_name"]] == "unipc":
        cfg = _validated(config, _UNIPC_DEFAULTS, _UNIPC_INERT, _UNIPC_REQUIRED)
        return _unipc_plan(cfg, num_inference_steps)
    cfg = _validated(config, _EULER_DEFAULTS, set(), _EULER_REQUIRED)
    return _euler_plan(cfg, num_inference_steps, image_seq_len)


def _validated(config: dict, defaults: dict, inert: set, required: dict) -> dict:
    """diffusers' defaults overlaid with the config; every option checked, unknown options refused."""
    name = config["_class_name"]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults and k not in inert)
    if unknown:
        raise SchedulerConfigError(f"{name} options {unknown} are unknown to this runtime (a newer diffusers?); "
                                   "remove them or extend runtime/schedulers.py with a parity test")
    cfg = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    for key, (want, why) in required.items():
        if cfg[key] != want or type(cfg[key]) is not type(want):
            raise SchedulerConfigError(f"{name}: {key}={cfg[key]!r} is not supported, need {want!r}: {why}")
    if not _is_int(train := cfg["num_train_timesteps"]) or train < 1:
        raise SchedulerConfigError(f"{name}: num_train_timesteps must be an int >= 1, got {train!r}")
    for key in ("flow_shift", "shift"):
        value = cfg.get(key, 1.0)
        if not _is_number(value) or value <= 0:
            raise SchedulerConfigError(f"{name}: {key} must be a positive finite number, got {value!r}")
    return cfg


def _unipc_plan(cfg: dict, n: int) -> SchedulePlan:
    """UniPC bh2, flow sigmas, data prediction: WanPipeline's `set_timesteps(N)` then N `step` calls."""
    order, disabled = cfg["solver_order"], cfg["disable_corrector"]
    train, shift = cfg["num_train_timesteps"], float(cfg["flow_shift"])
    if not _is_int(order) or not 1 <= order <= 3:
        raise SchedulerConfigError(f"UniPC solver_order={order!r} is not supported, need 1, 2 or 3 (parity-tested)")
    if not isinstance(disabled, (list, tuple)) or not all(_is_int(i) for i in disabled):
        raise SchedulerConfigError(f"UniPC disable_corrector must be a list of step indices, got {disabled!r}")
    # diffusers' set_timesteps, use_flow_sigmas branch, float64 throughout, as written there.
    s = np.linspace(1, 1 / train, n + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if np.fabs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6  # keeps log(sigma / (1 - sigma)) finite at the first step
    timesteps = (s * train).astype(np.int64)  # the pipeline feeds int64 timesteps (truncated)
    # diffusers steps with float32 sigmas: use exactly those values, then do the algebra in float64.
    sigmas = np.concatenate([s, [0.0]]).astype(np.float32).astype(np.float64)  # (N + 1,)
    coefficients = unipc_coefficients(sigmas, order, frozenset(disabled))
    return SchedulePlan("unipc", tuple(float(t) for t in timesteps), tuple(sigmas.tolist()),
                        _nested(coefficients), order)


def unipc_coefficients(sigmas: np.ndarray, order: int, disable_corrector: frozenset[int] = frozenset()) -> np.ndarray:
    """Per-step linear maps of diffusers' UniPC (bh2, predict_x0, flow sigmas, lower_order_final).

    sigmas: (N + 1,) float64, decreasing, last 0. Returns (N, 3, 3 + order) float64, layout in the module
    docstring. diffusers' step i: convert m_i = x_i - sigma_i v_i; correct x_i into xc_i with UniC of the
    previous step's order (from xc_{i-1}, m_{i-1}.., m_i); predict x_{i+1} with UniP of order
    min(order, N - i, i + 1) from xc_i, m_i, m_{i-1}...
    """
    n, width = len(sigmas) - 1, COL_HISTORY + order
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, which bh2 handles (e^-inf = 0)
        lam = np.log(1 - sigmas) - np.log(sigmas)  # (N + 1,) log-SNR of flow sigmas: alpha = 1 - sigma
    p_order = [min(order, n - i, i + 1) for i in range(n)]  # UniP order per step (warm-up, lower_order_final)
    out = np.zeros((n, 3, width))
    for i in range(n):
        m_row = np.zeros(width)
        m_row[COL_X], m_row[COL_V] = 1.0, -sigmas[i]  # m_i = x_i - sigma_i v_i (flow_prediction -> x0)
        c_row = np.zeros(width)
        if i == 0 or (i - 1) in disable_corrector:
            c_row[COL_X] = 1.0  # no corrector: xc_i = x_i
        else:  # UniC: interval (sigma_{i-1} -> sigma_i), m0 = m_{i-1}, earlier points m_{i-1-k}
            q = p_order[i - 1]
            c_prev, c_m0, c_hist, c_this = _bh2(sigmas[i], sigmas[i - 1], lam[i], lam[i - 1],
                                                [lam[i - 1 - k] for k in range(1, q)], corrector=True)
            c_row[COL_LAST], c_row[COL_HISTORY] = c_prev, c_m0
            c_row[COL_HISTORY + 1:COL_HISTORY + q] = c_hist  # m_{i-1-k}, k = 1..q-1
            c_row += c_this * m_row
        p = p_order[i]  # UniP: interval (sigma_i -> sigma_{i+1}), m0 = m_i, earlier points m_{i-k}
        c_prev, c_m0, c_hist, _ = _bh2(sigmas[i + 1], sigmas[i], lam[i + 1], lam[i],
                                       [lam[i - k] for k in range(1, p)], corrector=False)
        x_row = c_prev * c_row + c_m0 * m_row
        x_row[COL_HISTORY:COL_HISTORY + p - 1] += c_hist  # m_{i-k}, k = 1..p-1
        out[i] = x_row, c_row, m_row
    if not np.all(np.isfinite(out)):
        raise SchedulerConfigError("UniPC coefficients are not finite for this sigma schedule (repeated sigmas?)")
    return out


def _bh2(sig_t, sig_s0, lam_t, lam_s0, lam_hist: Sequence[float], corrector: bool):
    """One UniP/UniC bh2 update (diffusers' multistep_uni_{p,c}_bh_update, predict_x0) as coefficients.

    Returns (on the base sample, on m0, [on each earlier m_k], on this step's model output m_t (UniC only)):
    x_t = sig_t/sig_s0 x - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) (sum_k rho_k (m_k - m0) / r_k + rho_t (m_t - m0)).
    """
    h = lam_t - lam_s0
    hh = -h  # predict_x0
    h_phi_1 = b_h = np.expm1(hh)  # h phi_1(h) = e^hh - 1; bh2's B(h) is the same number
    rks = np.array([(lk - lam_s0) / h for lk in lam_hist] + [1.0])  # (order,)
    order = len(rks)
    r_mat, b = np.zeros((order, order)), np.zeros(order)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for j in range(order):
        r_mat[j], b[j] = rks**j, h_phi_k * factorial / b_h
        factorial *= j + 2
        h_phi_k = h_phi_k / hh - 1 / factorial
    # diffusers fixes rho = 0.5 for UniC-1 and UniP-2 instead of solving; keep that.
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b)
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1]) if order > 2 else []
    alpha_t = 1 - sig_t
    c_m0 = -alpha_t * h_phi_1
    c_hist = []
    for k in range(order - 1):  # D1_k = (m_k - m0) / r_k
        c = -alpha_t * b_h * rhos[k] / rks[k]
        c_hist.append(c)
        c_m0 -= c
    c_this = -alpha_t * b_h * rhos[-1] if corrector else 0.0
    return sig_t / sig_s0, c_m0 - c_this, c_hist, c_this


def _euler_plan(cfg: dict, n: int, image_seq_len: int | None) -> SchedulePlan:
    """FlowMatchEuler as SanaPipeline (static shift) or FluxKontextPipeline (dynamic shifting) sets it up."""
    train = cfg["num_train_timesteps"]
    if cfg["use_dynamic_shifting"]:
        if not _is_int(image_seq_len) or image_seq_len < 1:
            raise SchedulerConfigError(f"dynamic shifting needs image_seq_len, the packed target-image token "
                                       f"count (an int >= 1), got {image_seq_len!r}")
        lens, shifts = (cfg["base_image_seq_len"], cfg["max_image_seq_len"]), (cfg["base_shift"], cfg["max_shift"])
        if not all(map(_is_int, lens)) or lens[0] == lens[1] or not all(map(_is_number, shifts)):
            raise SchedulerConfigError(f"dynamic shifting needs two different int seq lens and two finite shifts, "
                                       f"got base/max_image_seq_len {lens}, base/max_shift {shifts}")
        mu = calculate_shift(image_seq_len, *lens, *shifts)
        # FluxKontextPipeline passes sigmas linspace(1, 1/N, N); diffusers casts them to float32 and shifts in
        # float32: exp(mu) / (exp(mu) + (1/t - 1) ** 1.0), the power being the identity.
        t = np.linspace(1.0, 1 / n, n).astype(np.float32)
        e = np.float32(math.exp(mu))
        sig32 = e / (e + (np.float32(1) / t - np.float32(1)))
    else:
        image_seq_len = None
        shift = float(cfg["shift"])
        # the scheduler's __init__ builds its sigma range in float32 (already shifted), set_timesteps(N) spaces
        # the timesteps linearly over that range in float64 and shifts again: diffusers' exact sequence.
        ends = np.array([train, 1], dtype=np.float32) / np.float32(train)
        ends = np.float32(shift) * ends / (np.float32(1) + np.float32(shift - 1) * ends)
        t = np.linspace(float(ends[0]) * train, float(ends[1]) * train, n)
        s = t / train
        sig32 = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    timesteps = sig32 * np.float32(train)  # float32, as diffusers multiplies
    sigmas = np.concatenate([sig32, np.zeros(1, np.float32)]).astype(np.float64)  # (N + 1,)
    out = np.zeros((n, 3, COL_HISTORY))
    out[:, ROW_NEXT, COL_X] = 1.0
    out[:, ROW_NEXT, COL_V] = np.append(sig32[1:], np.float32(0)) - sig32  # dt_i = sigma_{i+1} - sigma_i, float32
    return SchedulePlan("euler", tuple(timesteps.astype(np.float64).tolist()), tuple(sigmas.tolist()),
                        _nested(out), 0, image_seq_len)


def _nested(a: np.ndarray) -> tuple:
    return tuple(tuple(map(tuple, step)) for step in a.tolist())  # (N, 3, W) float64 -> tuples of Python floats
