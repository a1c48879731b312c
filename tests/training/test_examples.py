"""Every example launch script passes only flags the pretraining entry point accepts."""

import glob
import os
import re
import shlex
import subprocess

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
SCRIPTS = sorted(glob.glob(os.path.join(EXAMPLES, "*.sh")) +
                 glob.glob(os.path.join(EXAMPLES, "*.sbatch")))
ENTRY = "megatron_anchor.training.pretrain"
WRAPPER = "run_default.sh\""  # run_default_tp2.sh passes its flags through run_default.sh


def logical_lines(text):
    """Lines with backslash continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    return [line.split(" #")[0] for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def pretrain_flags(text):
    """Flags in *_ARGS=( ... ) arrays, in `ARGS+=(...)`, and on the line that runs the entry."""
    flags = []
    for body in re.findall(r"\b\w*ARGS\+?=\((.*?)\)", text, flags=re.S):
        flags += [t for t in shlex.split(body, comments=True) if t.startswith("--")]
    for line in logical_lines(text):
        for entry in (ENTRY, WRAPPER):
            if entry not in line:
                continue
            after = line.split(entry, 1)[1]
            flags += [t for t in shlex.split(after) if t.startswith("--")]
            break
    return flags


def accepted_flags():
    from megatron_anchor.training.arguments import build_parser

    return {opt for action in build_parser()._actions for opt in action.option_strings}


def test_there_are_examples():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"run_default.sh", "run_default_tp2.sh", "slurm_anchor.sbatch"} <= names
    for model in ("llama2_7b", "llama3_8b", "mistral_7b_v0.3", "qwen1.5_1.8b"):
        for ctx in ("64k", "128k"):
            assert f"pretrain_{model}_{ctx}.sh" in names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_example_flags_are_accepted(script):
    with open(script, encoding="utf-8") as f:
        text = f.read()
    flags = pretrain_flags(text)
    if ENTRY in text or WRAPPER in text:
        assert flags, f"{script}: found no pretrain flags"
    unknown = sorted(set(flags) - accepted_flags())
    assert not unknown, f"{os.path.basename(script)} passes unknown flags {unknown}"


CLUSTER_SCRIPTS = [s for s in SCRIPTS if os.path.basename(s).startswith("pretrain_")]

# The base models' architectures (their Hugging Face config.json): the launch scripts take
# them from the imported checkpoint, so the layout checks below need them from here.
ARCHITECTURES = {
    "llama2_7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                      num_attention_heads=32, num_query_groups=32, vocab_size=32000),
    "llama3_8b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                      num_attention_heads=32, num_query_groups=8, vocab_size=128256),
    "mistral_7b_v0.3": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                            num_attention_heads=32, num_query_groups=8, vocab_size=32768),
    "qwen1.5_1.8b": dict(num_layers=24, hidden_size=2048, ffn_hidden_size=5504,
                         num_attention_heads=16, num_query_groups=16, vocab_size=151936,
                         add_qkv_bias=True, share_embeddings_and_output_weights=False),
}


def base_architecture(script, model_config):
    """The script's base model as the imported checkpoint would give it."""
    import dataclasses

    name = re.match(r"pretrain_(.+)_(64k|128k)\.sh", os.path.basename(script)).group(1)
    return dataclasses.replace(model_config, **ARCHITECTURES[name])


def launched_argv(script, tmp_path, *extra):
    """Run a launch script with a stand-in `torchrun` that records its arguments: the real
    argv that bash builds (arrays, the shared recipe, defaults), not a parse of the text."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "torchrun"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / "argv.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "SAVE")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", ARGV_OUT=str(out))
    subprocess.run(["bash", script, *extra], env=env, check=True, timeout=60)
    argv = out.read_text().splitlines()
    split = argv.index(ENTRY)
    return argv[:split - 1], argv[split + 1:]


def test_there_are_cluster_scripts():
    assert len(CLUSTER_SCRIPTS) == 8


@pytest.mark.parametrize("script", CLUSTER_SCRIPTS, ids=os.path.basename)
def test_cluster_scripts_parse_and_fit_the_layout(script, tmp_path):
    """The argv the script launches parses; TP x CP divides its nodes' GPUs; the recipe holds."""
    from megatron_anchor.training.arguments import config_from_args, parse_args

    launcher, argv = launched_argv(script, tmp_path, "--train-iters", "7")
    cfg = config_from_args(parse_args(argv))
    nodes = int(launcher[launcher.index("--nnodes") + 1])
    gpus = nodes * int(launcher[launcher.index("--nproc-per-node") + 1])
    p = cfg.parallel
    assert gpus % (p.tensor_model_parallel_size * p.context_parallel_size) == 0
    assert cfg.data.seq_length % (2 * p.context_parallel_size) == 0
    assert "--pretrained-checkpoint" in argv and "--num-layers" not in argv, \
        "the architecture comes from the imported checkpoint"
    model = base_architecture(script, cfg.model)
    assert model.num_attention_heads % p.tensor_model_parallel_size == 0
    assert model.num_query_groups % p.tensor_model_parallel_size == 0
    assert cfg.data.global_batch_size == 8 and cfg.optim.lr == 2e-5
    assert cfg.optim.weight_decay == 0.1 and (cfg.optim.adam_beta1, cfg.optim.adam_beta2) == (0.9, 0.95)
    assert cfg.optim.train_iters == 7, "extra flags given to a launch script must win"
    context = 64 * 1024 if "_64k" in script else 128 * 1024
    assert cfg.data.seq_length == context
    assert cfg.model.rotary_base == (5e6 if context == 64 * 1024 else 1e7)
    assert cfg.data.variant == "anchor" and p.sequence_parallel
    c = cfg.checkpoint
    assert c.exit_signal_handler and c.exit_signal == "SIGUSR1", "saves and exits on SIGUSR1"
    assert cfg.optim.check_for_nan_in_loss_and_grad
    assert c.keep_last_checkpoints == 5, "the evaluation averages the last 5 checkpoints"
    cfg.validate_checkpointing()


SBATCH = os.path.join(EXAMPLES, "slurm_anchor.sbatch")


def _sbatch_options():
    options = {}
    with open(SBATCH, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#SBATCH --"):
                key, _, value = line[len("#SBATCH --"):].strip().partition("=")
                options[key] = value
    return options


def test_slurm_template_asks_for_the_exit_signal_ahead_of_the_time_limit():
    options = _sbatch_options()
    name, _, lead = options["signal"].partition("@")
    hours, minutes, seconds = map(int, options["time"].split(":"))
    assert not name.startswith("B:"), "every process of the job step, not the batch shell"
    assert 300 <= int(lead) < 3600 * hours + 60 * minutes + seconds
    with open(os.path.join(EXAMPLES, "anchor_recipe.sh"), encoding="utf-8") as f:
        recipe = f.read()
    assert f"EXIT_SIGNAL:-SIG{name}" in recipe, "the recipe's --exit-signal is the one asked for"


def _fake(bindir, name, body):
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_the_exit_signal_reaches_only_the_trainer(tmp_path):
    """SLURM signals every process of a job step: the task's shell, the launch script and
    torchrun must live on (they ignore it) for the ranks to save and exit 0. A stand-in
    `srun` runs the task in its own session, as a job step; a stand-in `torchrun` sends
    SIGUSR1 to that whole session, then records the trainer's argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake(bindir, "srun", 'while [ "${1#-}" != "$1" ]; do shift; done\nexec setsid "$@"\n')
    _fake(bindir, "scontrol", "echo localhost\n")
    _fake(bindir, "torchrun", 'kill -USR1 0\nsleep 0.5\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
    out = tmp_path / "argv.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "SAVE")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", ARGV_OUT=str(out),
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0")
    script = os.path.join(EXAMPLES, "pretrain_llama3_8b_64k.sh")
    done = subprocess.run(["bash", SBATCH, script, "--train-iters", "7"], env=env,
                          timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, (done.returncode, done.stderr)
    argv = out.read_text().splitlines()
    assert argv[argv.index("--exit-signal") + 1] == "SIGUSR1" and "--exit-signal-handler" in argv


ONE_NODE_128K = [s for s in CLUSTER_SCRIPTS
                 if "_128k" in s and "qwen" not in os.path.basename(s)]


@pytest.mark.parametrize("script", ONE_NODE_128K, ids=os.path.basename)
def test_7b_128k_scripts_fit_one_node_with_recompute_and_distributed_optimizer(script, tmp_path):
    """The 7-8B 128K layouts run on one 8-GPU node because of full recomputation and the
    distributed optimizer; the memory estimate behind examples/README.md fits 80 GB (and
    would not without recomputation)."""
    from megatron_anchor.training.arguments import config_from_args, parse_args
    from tests.training.memory_estimate import Architecture, estimate

    launcher, argv = launched_argv(script, tmp_path)
    cfg = config_from_args(parse_args(argv))
    assert int(launcher[launcher.index("--nnodes") + 1]) == 1
    m, p = cfg.model, cfg.parallel
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == \
        ("full", "uniform", 1)
    assert p.use_distributed_optimizer and p.overlap_grad_reduce and p.overlap_param_gather
    cfg.validate_memory_features()
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    dp = 8 // (tp * cp)
    arch = Architecture.from_model_config(base_architecture(script, m))
    fitted = estimate(arch, cfg.data.seq_length, tp, cp, dp, recompute="full",
                      distributed_optimizer=True)
    assert fitted.total < 70e9, fitted.as_gb()  # ~10 GB left for buffers and workspaces
    assert estimate(arch, cfg.data.seq_length, tp, cp, dp).total > 80e9


def test_memory_estimate_by_hand():
    from megatron_anchor.model import CROSS_ENTROPY_CHUNK_ELEMENTS
    from tests.training.memory_estimate import Architecture, estimate

    arch = Architecture(num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=1,
                        ffn_hidden_size=16, vocab_size=32)
    # per layer: q, o 2*64, k, v 2*8*4, SwiGLU 3*8*16, norms 2*8 = 128+64+384+16 = 592
    assert arch.parameters == 2 * 592 + 2 * 32 * 8 + 8 == 1704
    e = estimate(arch, seq_length=100, tp=2, cp=2, dp=2, recompute="full",
                 distributed_optimizer=True)
    assert e.weights == 2 * 852 and e.gradients == 4 * 852 and e.optimizer == 12 * 852 / 4
    # 50 tokens per CP rank; stored per token: 2h + (h + 2kv) + h + h + 2h + 4f = 128 elements
    assert e.recompute_working_layer == 2 * 128 * 50 / 2
    assert e.activations_per_layer == 2 * 50 * 8 / 2
    assert e.logits == 2 * 50 * 32 / 2 + 2 * 4 * CROSS_ENTROPY_CHUNK_ELEMENTS
    plain = estimate(arch, seq_length=100, tp=2, cp=2, dp=2)
    assert plain.activations_per_layer == e.recompute_working_layer and plain.optimizer == 12 * 852
