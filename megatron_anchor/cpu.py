"""CPU shims for Megatron-Core: enable explicitly with `enable_cpu_mode()`, never on GPU.

Megatron-Core assumes CUDA in a few places that have nothing to do with the maths:
its model-parallel RNG tracker forks CUDA generator states, and some buffers are
allocated on `torch.cuda.current_device()`. On a CPU-only machine (CI, laptops) these
shims route both to the CPU so Megatron's own layers, DDP, optimizer and checkpointing
run unchanged over gloo.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megatron.core.tensor_parallel import random as mcore_random

_ENABLED = False


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's named RNG-state tracker, backed by the CPU generator."""

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


class _NoStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


_NO_STREAM = _NoStream()


def enable_cpu_mode() -> None:
    """Install the CPU shims. Refuses to run where CUDA is in use."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError("enable_cpu_mode() is for CPU-only runs; CUDA is already in use")
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Megatron allocates some buffers on torch.cuda.current_device(); "cpu" is a valid
    # device argument everywhere it is used.
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing synchronises the device before reading tensors; nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None
    # megatron-core >= 0.19 makes the current stream wait for CUDA-graph events before the
    # gradient reduction; on the CPU there is no stream and nothing to wait for.
    torch.cuda.current_stream = lambda device=None: _NO_STREAM
    _patch_optimizer_for_cpu()
    _patch_checkpoint_writer_for_cpu()
    _patch_schedules_for_cpu()
    _patch_recompute_rng_for_cpu()
    _patch_distributed_optimizer_for_cpu()
    _patch_mixed_precision_optimizer_for_cpu()
    _ENABLED = True


class _CudaDeviceToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites ``device='cuda'`` of tensor factories to the CPU (only where we enter it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaDeviceToCpu():
            return fn(*args, **kwargs)

    return wrapper


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm,
                                      use_decoupled_grad=False):
    """Megatron's `clip_grad_by_total_norm_fp32` without its CUDA type assertion."""
    from megatron.core.optimizer.clip_grads import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    name = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(getattr(p, name)).detach()
             for p in parameters if getattr(p, name, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_optimizer_for_cpu() -> None:
    """Megatron-Core's optimizer allocates a few scalars with a hard-coded ``device='cuda'``
    (loss scale, grad-norm buffers) and asserts ``torch.cuda.FloatTensor`` grads before
    clipping. Route those to the CPU; the optimizer maths (torch.optim.AdamW when neither
    TE nor apex is installed) is unchanged."""
    from megatron.core.optimizer import clip_grads, optimizer

    for cls in (optimizer.FP32Optimizer, optimizer.MixedPrecisionOptimizer):
        cls.__init__ = _on_cpu(cls.__init__)
    # megatron-core >= 0.19: a per-group flag all-reduced from a device='cuda' tensor.
    if hasattr(optimizer.MegatronOptimizer, "has_grad_norm_group"):
        base = optimizer.MegatronOptimizer
        base.has_grad_norm_group = _on_cpu(base.has_grad_norm_group)
    for module in (clip_grads, optimizer):
        module.get_grad_norm_fp32 = _on_cpu(clip_grads.get_grad_norm_fp32)
        module.count_zeros_fp32 = _on_cpu(clip_grads.count_zeros_fp32)
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu


def _patch_checkpoint_writer_for_cpu() -> None:
    """dist_checkpointing's writer processes log their memory use with psutil; without psutil
    installed the writer dies and the trainer waits forever. Log 0 bytes instead."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not filesystem_async.HAVE_PSUTIL:
        filesystem_async._process_memory = lambda: 0


def _patch_schedules_for_cpu() -> None:
    """`forward_backward_no_pipelining` counts trained tokens in a ``device='cuda'`` tensor.
    (`get_forward_backward_func` looks the function up in its module at call time.)"""
    from megatron.core.pipeline_parallel import schedules

    schedules.forward_backward_no_pipelining = _on_cpu(schedules.forward_backward_no_pipelining)


def _patch_recompute_rng_for_cpu() -> None:
    """Activation recomputation (`tensor_parallel.checkpoint`) saves the CPU generator, the
    CUDA generator and the tracker's states before a forward and restores them for the
    recomputation. On the CPU the CPU generator (and the tracker, CPU-backed here) is all
    there is: the CUDA part becomes a no-op."""
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: None
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: None


class _CpuTypeNamesAsCuda(torch.overrides.TorchFunctionMode):
    """``tensor.type()`` of a CPU tensor answers with its CUDA type name (only where entered):
    Megatron's distributed optimizer sorts parameters by ``torch.cuda.*Tensor`` names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if (getattr(func, "__name__", None) == "type" and len(args) == 1 and not kwargs
                and isinstance(result, str) and result.startswith("torch.")
                and not result.startswith("torch.cuda.")):
            return "torch.cuda." + result[len("torch."):]
        return result


def _patch_mixed_precision_optimizer_for_cpu() -> None:
    """`--bf16`: Megatron's `Float16OptimizerWithFloat16Params` (BF16 model weights, FP32 main
    weights, gradients and Adam state) accepts only ``torch.cuda.*Tensor`` parameters and
    makes a few buffers on ``device='cuda'``. Answer the type check for CPU tensors and route
    those buffers to the CPU; the FP32 master copies and the maths are Megatron's."""
    from megatron.core.optimizer import optimizer as mcore_optimizer

    cls = mcore_optimizer.Float16OptimizerWithFloat16Params
    init = cls.__init__

    @functools.wraps(init)
    def init_on_cpu(self, *args, **kwargs):
        with _CpuTypeNamesAsCuda(), _CudaDeviceToCpu():
            init(self, *args, **kwargs)

    cls.__init__ = init_on_cpu


def _patch_distributed_optimizer_for_cpu() -> None:
    """`DistributedOptimizer` (--use-distributed-optimizer) accepts only parameters whose
    ``type()`` is ``torch.cuda.FloatTensor`` (or Half/BFloat16) when it builds its FP32 shards,
    and allocates a few buffers on ``device='cuda'``. Answer the type check for CPU tensors
    and route those buffers to the CPU; the sharding, the reduce-scatter / all-gather over
    gloo and the optimizer maths are Megatron's, unchanged."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    build = cls._build_model_and_main_param_groups

    @functools.wraps(build)
    def build_on_cpu(*args, **kwargs):
        with _CpuTypeNamesAsCuda(), _CudaDeviceToCpu():
            return build(*args, **kwargs)

    cls._build_model_and_main_param_groups = staticmethod(build_on_cpu)
    cls.__init__ = _on_cpu(cls.__init__)
    # Loading a 'dp_reshardable' optimizer checkpoint copies into the FP32 main-weight
    # shards, which are views of the (grad-requiring) parameters when the weights are FP32,
    # as on the CPU; Megatron's other loaders already run under no_grad.
    cls.load_parameter_state_from_dp_reshardable = torch.no_grad()(
        cls.load_parameter_state_from_dp_reshardable)
    # Without TE or apex, Megatron's DistributedOptimizer wraps torch's AdamW, whose state
    # (with a per-parameter "step") is created lazily; two of its paths assume otherwise:
    # `state_dict()` asserts one step value among the states (so a fresh optimizer cannot
    # build the template to load a checkpoint into), and loading copies the template's
    # "step" over the step just restored from the param groups (one tensor object shared by
    # all parameters). Prime the state at
    # construction with what torch's first step would create (step 0, zero moments: the
    # maths is unchanged), and keep the restored step when loading.
    init = cls.__init__

    @functools.wraps(init)
    def init_and_prime(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _prime_torch_adam_state(self.optimizer)

    cls.__init__ = init_and_prime
    set_states = cls._set_main_param_and_optimizer_states

    @functools.wraps(set_states)
    def set_states_keeping_step(self, model_param, tensors):
        if "step" in tensors and isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                # load_state_dict hands every parameter the same step tensor object, which
                # torch's AdamW would then increment once per parameter: give each its own.
                state["step"] = state["step"].clone()
                tensors = dict(tensors, step=state["step"])
        return set_states(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states_keeping_step


def _prime_torch_adam_state(optimizer) -> None:
    """The state torch.optim.Adam(W)'s first step would create, for parameters without one."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(param,
                                                               memory_format=torch.preserve_format)


def model_parallel_manual_seed(seed: int) -> None:
    """CPU stand-in for `model_parallel_cuda_manual_seed` (same seeds, same names)."""
    from megatron.core import parallel_state as ps

    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
                seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
                + ps.get_expert_tensor_parallel_rank())
