"""Where one ONNX Runtime decode step goes (issue 11's goal: decode at >= 50% of the int8 weights'
bandwidth limit), in one run:

A. Read bandwidth (bench/generation.py's measure) and the limit: model.onnx.data bytes per step.
B. The converted model's step on the app's batch (2 rows, a --context-token cache), timed plainly,
   then with ONNX Runtime's profiler: time per operator type per step.
C. The model's MatMulNBits alone: the same shapes in the same order (int8, blocks of 32, accuracy
   level 4, 2 rows), random weights, one graph: the share of read bandwidth the kernels reach
   without attention, norms or Python. Their time is a floor under any step of this runtime.

    python bench/onnx_step.py [--context-tokens 700] [--steps 100]
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import _common
from _common import median, table
from generation import bandwidth


def decoder_and_cache(context: int):
    """The engine's ONNX decoder, its converted folder, and 2 rows of `context` random-token embeddings."""
    import torch

    from dep_engine.llm import load_llm, resolve_llm
    from dep_engine.onnx_decode import decoder_for
    from dep_engine.onnx_model import converted_folder

    llm = load_llm(device="cpu")
    decoder = decoder_for(llm)
    folder = converted_folder(resolve_llm(llm.name)[0], kv_cache=llm.onnx_kv_cache)
    ids = torch.randint(0, len(llm.tokenizer) - 1, (2, context), generator=torch.Generator().manual_seed(0))
    return decoder, folder, [llm.embed(row).detach() for row in ids]


def profiled_session(folder: Path, prefix: str):
    """A session on the converted model as the engine opens it, with ONNX Runtime's profiler on."""
    import onnxruntime as ort

    from dep_engine.onnx_decode import session_options

    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def run_steps(decoder, embeds, steps: int) -> float:
    """Steps per second of `steps` decode steps after the prompt (random next tokens)."""
    import numpy as np

    state = decoder._start(embeds, steps + 1)
    tokens = np.random.default_rng(0).integers(0, len(decoder.embedding), (steps, 2))
    start = time.perf_counter()
    for step in range(steps):
        decoder._step(state, decoder.embedding[tokens[step]][:, None])
    return steps / (time.perf_counter() - start)


def operator_times(profile: Path) -> tuple[dict[str, float], float]:
    """Milliseconds per step by operator type, and per step in all, from an ONNX Runtime profile."""
    events = json.loads(profile.read_text())
    per_op: collections.Counter = collections.Counter()
    runs, total = 0, 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            runs += 1
            total += event["dur"]
    return {op: us / runs / 1000 for op, us in per_op.most_common()}, total / runs / 1000


def matmul_shapes(model_path: Path) -> list[tuple[int, int]]:
    """(K, N) of every MatMulNBits of the converted model, in graph order."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [(attrs["K"], attrs["N"]) for node in graph.node if node.op_type == "MatMulNBits"
            for attrs in [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}]]


def matmuls_alone(shapes: list[tuple[int, int]], repeats: int = 30) -> tuple[float, int]:
    """Median seconds of one run of all `shapes` as int8 MatMulNBits on 2 rows, and their weight bytes."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, outputs, size = [], [], [], 0
    for n, (k, rows) in enumerate(shapes):
        weights += [numpy_helper.from_array(rng.integers(0, 255, (rows, k // 32, 32), dtype=np.uint8), f"B{n}"),
                    numpy_helper.from_array(rng.uniform(0.005, 0.015, rows * k // 32).astype(np.float32), f"S{n}")]
        nodes.append(helper.make_node("MatMulNBits", [f"A{k}", f"B{n}", f"S{n}"], [f"Y{n}"], domain="com.microsoft",
                                      K=k, N=rows, bits=8, block_size=32, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"Y{n}", TensorProto.FLOAT, [2, rows]))
        size += rows * k + rows * k // 32 * 4
    widths = sorted({k for k, _ in shapes})
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info(f"A{k}", TensorProto.FLOAT, [2, k])
                                                 for k in widths], outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    from dep_engine.onnx_decode import session_options

    options = session_options(2)  # as the engine's session
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "matmuls.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="matmuls.data")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {f"A{k}": rng.standard_normal((2, k)).astype(np.float32) for k in widths}
        for _ in range(3):
            session.run(None, inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, inputs)
            times.append(time.perf_counter() - start)
    return median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context-tokens", type=int, default=700, help="cached positions per row")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    _common.header("ONNX Runtime decode step: where the time goes (issue 11)",
                   f"2 rows, {args.context_tokens}-token cache, {args.steps} steps")

    read = bandwidth(2)["read"]
    decoder, folder, embeds = decoder_and_cache(args.context_tokens)
    step_bytes = (folder / "model.onnx.data").stat().st_size
    limit = read * 1e9 / step_bytes
    print(f"A. read bandwidth {read:.1f} GB/s; int8 weights {step_bytes / 1e6:.0f} MB per step: limit {limit:.0f} steps/s")

    plain = median([run_steps(decoder, embeds, args.steps) for _ in range(3)])
    engine_session = decoder.session
    with tempfile.TemporaryDirectory() as scratch:
        decoder.session = profiled_session(folder, str(Path(scratch) / "step"))
        try:
            run_steps(decoder, embeds, args.steps)
            per_op, total = operator_times(Path(decoder.session.end_profiling()))
        finally:
            decoder.session = engine_session
    print(f"\nB. the model's step: {plain:.1f} steps/s ({1000 / plain:.1f} ms, {plain / limit:.0%} of the limit) "
          f"without the profiler; with it {total:.1f} ms, by operator type:")
    rows = [[op, f"{ms:.2f}", f"{ms / total:.0%}"] for op, ms in per_op.items() if ms >= 0.05]
    table(["operator", "ms per step", "share"], rows)

    shapes = matmul_shapes(folder / "model.onnx")
    seconds, size = matmuls_alone(shapes)
    print(f"\nC. the {len(shapes)} MatMulNBits alone: {size / 1e6:.0f} MB in {seconds * 1000:.2f} ms = "
          f"{size / seconds / 1e9:.1f} GB/s ({size / seconds / 1e9 / read:.0%} of read bandwidth); "
          f"a step of this runtime cannot beat {1 / seconds:.0f} steps/s ({1 / seconds / limit:.0%} of the limit) "
          f"even with attention, norms and Python free")


if __name__ == "__main__":
    main()
