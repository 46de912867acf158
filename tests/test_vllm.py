"""The vLLM backend against the real vLLM CPU build (.venv-vllm/, made by `bash setup.sh --dev`) serving the
bundled SmolLM2 in float32: two server processes started once for the session, the engine as their client.

Never skipped: without .venv-vllm/ the fixture fails and says how to make it."""
from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dep_engine import vllm_backend
from dep_engine.engine import DEPEngine, EngineConfig
from dep_engine.evaluation import EvalSettings, evaluate, read_generations
from dep_engine.generation import generate
from dep_engine.settings import PersonalizationSettings, SamplingSettings
from dep_engine import splits
from dep_engine.llm import resolve_llm

SHORT = SamplingSettings(max_new_tokens=16, seed=3)
AGREEMENT_USERS, AGREEMENT_TOKENS = 10, 32


def start_vllm_servers() -> list:
    """Two float32 vLLM servers of the bundled SmolLM2, one thread each on a core of its own, started together
    (29 s here, against 43 s when vLLM binds both to core 0)."""
    vllm_backend.vllm_python()  # a VLLMError saying to run `bash setup.sh --dev` when vLLM is missing
    model = resolve_llm("HuggingFaceTB/SmolLM2-135M-Instruct")[0]
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(vllm_backend.LocalServer.start, model, dtype="float32", kv_cache_gib=1, threads=1,
                                max_model_len=4096, ready_timeout_s=480, cpus=str(core)) for core in range(2)]
    servers = [job.result() for job in starting if job.exception() is None]
    failed = [job.exception() for job in starting if job.exception() is not None]
    if failed:
        for server in servers:
            server.close()
        raise failed[0]
    return servers


@pytest.fixture(scope="session")
def vllm_servers():
    """Two float32 servers (one thread each: this machine has 2 cores), started together once for the session."""
    servers = start_vllm_servers()  # a VLLMError saying to run `bash setup.sh --dev` when vLLM is missing
    try:
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.close()


@pytest.fixture(scope="session")
def local_engine():
    """The PyTorch float32 path, the reference."""
    return DEPEngine(EngineConfig(cpu_backend="torch", cpu_decode="float32"), progress=False)


@pytest.fixture(scope="session")
def vllm_engine(vllm_servers, local_engine):
    """The engine as a client of the first server, built from its config (`--vllm-url`)."""
    return DEPEngine(EngineConfig(vllm_url=vllm_servers[0]), progress=False)


def test_every_mode_is_answered_with_the_output_rules(vllm_engine):
    request = vllm_engine.user_request(next(iter(vllm_engine.users)))
    modes = ("nonperso", "generic", "dep", "his+diff")
    result = vllm_engine.generate(request, modes, sampling=SHORT)
    assert set(result.texts) == set(modes)
    for mode, text in result.texts.items():
        assert text.strip(), mode  # the no-empty-review rule, continued on the server where needed
        assert "[" not in text, mode  # banned by allowed_token_ids
    assert result.timings["generation"] > 0


def test_compare_two_reviewers_and_strength(vllm_engine):
    users = list(vllm_engine.users)[:2]
    requests = [vllm_engine.user_request(u) for u in users]
    final = None
    for final in vllm_engine.stream_compare(requests, "dep", sampling=SHORT):
        pass
    assert len(final) == 2 and all(r.texts["dep"].strip() for r in final)
    half = vllm_engine.generate(requests[0], ("dep",), PersonalizationSettings(strength=0.5), SHORT)
    assert half.texts["dep"].strip()


def test_streaming_yields_partial_texts_and_ends_as_generate(vllm_engine):
    request = vllm_engine.user_request(next(iter(vllm_engine.users)))
    parts = list(vllm_engine.stream(request, ("generic", "dep"), sampling=SHORT))
    assert len(parts) > 5
    lengths = [len(p.texts["dep"]) for p in parts[:-1]]
    assert lengths[0] < max(lengths)  # the text grows as it is written (hygiene may shorten a partial one)
    assert parts[-1].texts == vllm_engine.generate(request, ("generic", "dep"), sampling=SHORT).texts


def test_same_seed_gives_the_same_text(vllm_engine):
    request = vllm_engine.user_request(list(vllm_engine.users)[3])
    settings = SamplingSettings(max_new_tokens=16, seed=11, temperature=1.0)
    first = vllm_engine.generate(request, ("generic", "dep"), sampling=settings).texts
    again = vllm_engine.generate(request, ("generic", "dep"), sampling=settings).texts
    assert first == again


def test_greedy_float32_texts_agree_with_the_pytorch_path(local_engine, vllm_servers):
    """The first 32 greedy tokens of held-out users' DEP prompts, vLLM (float32) against PyTorch float32."""
    samples = splits.test_samples(local_engine.dataset.reviews)[:AGREEMENT_USERS]
    short = PersonalizationSettings(k=1, words_per_review=40)  # short DEP prompts: PyTorch float32 reads them slowly
    embeds = [local_engine.prepare(local_engine.sample_request(s), ("dep",), short).embeds[0] for s in samples]
    started = time.perf_counter()
    settings = SamplingSettings(max_new_tokens=AGREEMENT_TOKENS, temperature=0)
    local = generate(local_engine.llm, embeds, settings)
    remote = vllm_backend.attach(local_engine.llm, ",".join(vllm_servers))
    middle = time.perf_counter()
    served = generate(remote, embeds, settings)
    print(f"\nPyTorch float32 {middle - started:.1f} s, vLLM float32 on two servers {time.perf_counter() - middle:.1f} s "
          f"for {len(embeds)} prompts of {sorted(len(e) for e in embeds)} tokens")
    tokenizer = local_engine.llm.tokenizer
    agree, compared = 0, []
    for a, b in zip(local, served):
        ta, tb = tokenizer(a.text)["input_ids"], tokenizer(b.text)["input_ids"]
        n = min(len(ta), len(tb))  # a row that stops (end of text, or a hygiene cut: checked every 4 tokens) is shorter
        agree += n > 0 and ta[:n] == tb[:n]
        compared.append(n)
    print(f"\ngreedy float32 agreement over the first {AGREEMENT_TOKENS} tokens: {agree}/{len(samples)} users "
          f"(tokens compared per user: {compared})")
    assert agree >= 9


def test_two_servers_share_a_batch(vllm_servers, local_engine):
    remote = vllm_backend.attach(local_engine.llm, ",".join(vllm_servers))
    request = local_engine.user_request(next(iter(local_engine.users)))
    embeds = local_engine.prepare(request, ("generic", "dep")).embeds * 2
    outputs = generate(remote, embeds, SamplingSettings(max_new_tokens=8))
    assert len(outputs) == 4 and all(o.text for o in outputs)
    assert [s.served for s in vllm_backend.client_for(remote).servers] == [2, 2]  # least busy first


def test_evaluate_submits_every_group_at_once(vllm_engine, tmp_path):
    evaluate(vllm_engine.config, EvalSettings(methods=["generic", "dep"], limit=3, batch_users=1, generate_only=True,
                                              out=str(tmp_path), sampling=SamplingSettings(max_new_tokens=8),
                                              personalization=PersonalizationSettings(k=2, words_per_review=40)),
             engine=vllm_engine)
    records = read_generations(tmp_path / "generations.jsonl")
    assert sorted({r["group"] for r in records}) == [0, 1, 2] and len(records) == 6
    assert all(r["text"].strip() for r in records)


def test_a_dead_server_hands_its_rows_to_a_live_one(vllm_servers, local_engine, caplog):
    dead = f"http://127.0.0.1:{vllm_backend.free_port()}"
    client = vllm_backend.Client([dead, vllm_servers[0]], local_engine.llm.tokenizer, local_engine.llm.hidden_size,
                                 local_engine.llm.embed)
    request = local_engine.user_request(next(iter(local_engine.users)))
    embeds = local_engine.prepare(request, ("dep",)).embeds * 2
    with caplog.at_level(logging.WARNING):
        outputs = client.decode(embeds, SamplingSettings(max_new_tokens=4))
    assert all(o.text for o in outputs)
    assert dead in caplog.text
    client.close()


def test_an_unreachable_url_is_named(local_engine):
    dead = f"http://127.0.0.1:{vllm_backend.free_port()}"
    with pytest.raises(vllm_backend.VLLMError, match=re.escape(dead)):
        vllm_backend.attach(local_engine.llm, dead)
    client = vllm_backend.Client(dead, local_engine.llm.tokenizer, local_engine.llm.hidden_size, local_engine.llm.embed)
    row = torch.zeros(3, local_engine.llm.hidden_size)
    with pytest.raises(vllm_backend.VLLMError, match=re.escape(dead)):
        client.decode([row], SamplingSettings(max_new_tokens=4))
    client.close()


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 5, 576), "must be \\(tokens, 576\\)"),
    (torch.zeros(5, 64), "must be \\(tokens, 576\\)"),
    (torch.zeros(0, 576), "must be \\(tokens, 576\\)"),
    (torch.zeros(5, 576, dtype=torch.int64), "float32, bfloat16 or float16"),
    (torch.full((5, 576), float("nan")), "NaN"),
])
def test_a_wrong_tensor_is_refused_before_sending(bad, message, smol_tokenizer):
    """Nothing listens at the URL: a refusal here proves nothing was sent."""
    client = vllm_backend.Client(f"http://127.0.0.1:{vllm_backend.free_port()}", smol_tokenizer, 576, lambda ids: None)
    with pytest.raises(vllm_backend.PromptEmbedsError, match=message):
        client.submit([torch.zeros(4, 576), bad], SamplingSettings())
    client.close()


def test_the_server_command_has_the_safe_flags():
    command = vllm_backend.server_command("/models/smol", dtype="float32")
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-prompt-embeds" in command and command[command.index("--host") + 1] == "127.0.0.1"
    assert int(command[command.index("--max-num-batched-tokens") + 1]) >= 8192  # no chunked prefill
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    args = vllm_backend.add_command(sub).parse_args(["--port", "9001", "--", "--data-parallel-size", "2"])
    assert args.host == "127.0.0.1" and args.port == 9001 and args.vllm_args[-2:] == ["--data-parallel-size", "2"]
