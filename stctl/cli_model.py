"""`stctl model ...`: build, run, benchmark and export model packages (the `model` library)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stctl.cli_common import console, err_console, escape, fail, handles_errors, print_json, progress_bar

app = typer.Typer(help="Build, run, benchmark and export model packages.\n\n"
                  "Example: stctl model run demo-v1 --prompt 'Torque check' --json", no_args_is_help=True)


@app.command("build")
@handles_errors
def build(
    out: Path = typer.Option(..., "--out", "-o", help="Package directory to create (must not exist)."),
    from_hf: Optional[Path] = typer.Option(None, "--from-hf", help="HF checkpoint dir (config.json + safetensors)."),
    demo: bool = typer.Option(False, "--demo", help="Build the trained built-in st-demo model (model/demo_weights)."),
    demo_variant: int = typer.Option(1, "--demo-variant", help="Demo variant: 1, or 2 (v1 with a quarter of its experts fine-tuned on line 7)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset shape: smallthinker-4b-a0.6b, smallthinker-21b-a3b, st-demo."),
    random_weights: bool = typer.Option(False, "--random-weights", help="With --preset: seeded random weights."),
    seed: int = typer.Option(0, "--seed", help="Seed for --random-weights."),
    quant: str = typer.Option("q4_0", "--quant", help="q4_0 or bf16."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the manifest."),
    version: Optional[str] = typer.Option(None, "--version", help="Semantic version, e.g. 1.0.0."),
    health_min_tps: float = typer.Option(0.0, "--health-min-tokens-per-s", help="Health gate: minimum decode tokens/s."),
    health_max_rss: Optional[str] = typer.Option(None, "--health-max-rss", help="Health gate: maximum peak RSS, e.g. 1GiB."),
    sparse_down: bool = typer.Option(False, "--sparse-down", help="Store expert down matrices transposed for sparse ReGLU."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build a quantized model package.

    Example: stctl model build --demo --out demo-v1
    """
    from model.build import build_demo, build_from_hf, build_random
    from model.memory import format_size, parse_size

    sources = sum([from_hf is not None, demo, preset is not None])
    if sources != 1:
        fail("choose exactly one source: --from-hf DIR, --demo, or --preset NAME --random-weights")
    if preset is not None and not random_weights:
        fail("--preset needs --random-weights (presets have no released weights here)")
    kw = dict(quant=quant, health_min_tokens_per_s=health_min_tps, sparse_down=sparse_down,
              health_max_rss_bytes=parse_size(health_max_rss) if health_max_rss else None)
    if name:
        kw["name"] = name
    with progress_bar("building", enabled=not as_json) as update:
        kw["progress"] = update
        if demo:
            manifest = build_demo(out, variant=demo_variant, version=version, **kw)
        elif from_hf is not None:
            manifest = build_from_hf(from_hf, out, version=version or "1.0.0", **kw)
        else:
            manifest = build_random(preset, out, seed=seed, version=version or "1.0.0", **kw)
    summary = {"package": str(out), "name": manifest.name, "version": manifest.version, "quant": manifest.quant,
               "shards": len(manifest.shards), "expert_shards": len(manifest.expert_shards()),
               "bytes": manifest.total_bytes}
    if as_json:
        print_json(summary)
    else:
        console.print(f"built [bold]{manifest.name} {manifest.version}[/] ({manifest.quant}) at {escape(str(out))}: "
                      f"{summary['shards']} shards, {format_size(manifest.total_bytes)}")


def _check_prompt(prompt: Optional[str], prompt_ids: Optional[str], chat: bool) -> list[int] | None:
    """The --prompt-ids as ids (None when the prompt is text or, in a chat, read from stdin)."""
    if chat:
        if prompt_ids is not None:
            fail("--chat takes --prompt TEXT (or turns on stdin), not --prompt-ids")
        return None
    if (prompt is None) == (prompt_ids is None):
        fail("give exactly one of --prompt TEXT or --prompt-ids 1,2,3 (or --chat)")
    if prompt_ids is not None:
        try:
            return [int(p) for p in prompt_ids.split(",") if p.strip()]
        except ValueError:
            fail(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers")
    return None


@app.command("run")
@handles_errors
def run(
    package: Path = typer.Argument(..., help="Model package directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (with --chat: the user's message)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Prompt token ids, comma-separated."),
    chat: bool = typer.Option(False, "--chat", help="Talk to the model through its chat template: --prompt is "
                              "one user message; without --prompt, each line on stdin is a turn of one conversation."),
    system: Optional[str] = typer.Option(None, "--system", help="With --chat: a system message first."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate (per turn)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Memory budget, e.g. 512MiB or 1GiB."),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, text and figures as JSON (one object per turn)."),
) -> None:
    """Generate text from a package and report speed and memory.

    Examples: stctl model run demo-v1 --prompt "Line 4 torque check:" --max-new-tokens 16 --json;
    stctl model run demo-v1 --chat --prompt "Write the torque check record for Line 4." -n 64
    """
    import sys

    from model import Engine
    from model.memory import parse_size

    if system is not None and not chat:
        fail("--system needs --chat")
    ids = _check_prompt(prompt, prompt_ids, chat)
    budget = parse_size(memory_budget) if memory_budget else None
    engine = Engine.load(package, memory_budget_bytes=budget, threads=threads)
    tokenizer = engine.tokenizer
    sampling = {"temperature": temperature, "seed": seed, "top_p": top_p}
    if not chat:
        _generate(engine, ids if ids is not None else tokenizer.encode(prompt), max_new_tokens, sampling, as_json)
        return
    if tokenizer.chat_template is None:
        fail(f"{package}: this model has no chat template; run it without --chat")
    messages = [{"role": "system", "content": system}] if system is not None else []
    typing = prompt is None and sys.stdin.isatty()
    turns = [prompt] if prompt is not None else _typed_turns() if typing else (line.rstrip("\n") for line in sys.stdin)
    for turn in turns:
        if not turn.strip():
            continue
        messages.append({"role": "user", "content": turn})
        if not as_json and prompt is None and not typing:
            console.print(f"[bold]> [/]{escape(turn)}")
        text = _generate(engine, tokenizer.encode(tokenizer.chat_template.render(messages)), max_new_tokens,
                         sampling, as_json)
        messages.append({"role": "assistant", "content": text})


def _typed_turns():
    """Lines typed at a `> ` prompt, until end of input (Ctrl-D)."""
    while True:
        try:
            yield console.input("[bold]> [/]")
        except EOFError:
            return


def _generate(engine, ids: list[int], max_new_tokens: int, sampling: dict, as_json: bool) -> str:
    """Generate from `ids`, printing text as it comes (or JSON at the end); the text generated."""
    from model.tokenizer import TextStream

    tokenizer = engine.tokenizer
    stream, tokens, pieces = TextStream(tokenizer), [], []
    for token in engine.generate(ids, max_new_tokens, stop_ids=tokenizer.stop_ids, **sampling):
        tokens.append(token)
        if token in tokenizer.stop_ids:  # the last token: it ends the text, it is not text
            continue
        piece, _ = stream.feed(token)
        pieces.append(piece)
        if not as_json:
            console.print(piece, end="", markup=False, highlight=False)
    pieces.append(stream.flush())
    if not as_json:
        console.print(pieces[-1], markup=False, highlight=False)
    text, stats = "".join(pieces), engine.last_stats
    if as_json:
        print_json({"tokens": tokens, "text": text, **stats})
    else:
        console.print(f"[dim]prefill {stats['prefill_ms']:.1f} ms, decode {stats['decode_tokens_per_s']:.1f} tok/s, "
                      f"peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB[/]")
    return text


@app.command("train-demo")
@handles_errors
def train_demo(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the checkpoint files into."),
    variant: int = typer.Option(1, "--variant", help="1: tokenizer + model from scratch; 2: v1's expert fine-tune on line 7."),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps."),
    batch: int = typer.Option(16, "--batch", help="Rows per step."),
    length: int = typer.Option(128, "--length", help="Tokens per row."),
    lr: float = typer.Option(4e-3, "--lr", help="Peak learning rate (cosine to a tenth)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and the row sampler."),
    threads: int = typer.Option(1, "--threads", help="CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the training record as JSON."),
) -> None:
    """Train the demo checkpoint (HF format + training.json) on the project's own corpus.

    The shipped model/demo_weights/v1 and v2 were made by this command (their training.json
    records how). Example: stctl model train-demo --out model/demo_weights/v1 --steps 300
    """
    import shlex
    import sys

    import torch

    from model.demo_checkpoint import finetune_v2, train_v1
    from model.train import TrainSettings

    if variant not in (1, 2):
        fail("--variant must be 1 or 2")
    if min(steps, batch, length, threads) < 1 or lr <= 0:
        fail("--steps, --batch, --length and --threads must be >= 1 and --lr > 0")
    torch.set_num_threads(threads)
    settings = TrainSettings(steps=steps, batch=batch, length=length, lr=lr, seed=seed,
                             warmup=min(20, max(1, steps // 10)))
    command = "stctl model train-demo " + shlex.join(sys.argv[sys.argv.index("train-demo") + 1:]
                                                     if "train-demo" in sys.argv else [])

    def log(entry: dict) -> None:
        if not as_json and (entry["step"] % 20 == 0 or entry["step"] == steps - 1):
            console.print(f"step {entry['step']:4d}  loss {entry['loss']:.3f}  balance {entry['balance']:.3f}  "
                          f"min expert share {entry['min_expert_share']:.3f}  {entry['seconds']:.0f}s", markup=False)

    make = train_v1 if variant == 1 else finetune_v2
    record = make(out, settings, command, log=log)
    if as_json:
        print_json(record)
    else:
        console.print(f"wrote {out}: held-out loss {record['heldout_loss']} in {record['seconds']:.0f}s", markup=False)


@app.command("export-gguf")
@handles_errors
def export_gguf(
    package: Path = typer.Argument(..., help="Model package directory (q4_0)."),
    out: Path = typer.Argument(..., help="GGUF file to write (must not exist)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a package as a GGUF file that llama.cpp loads as `smallthinker`.

    Example: stctl model export-gguf demo-v1 demo-v1.gguf
    """
    from model.gguf_export import export_gguf as export

    with progress_bar("exporting", enabled=not as_json) as update:
        info = export(package, out, progress=update)
    if as_json:
        print_json(info)
    else:
        console.print(f"wrote {out} ({info['tensors']} tensors, {info['bytes']} bytes)", markup=False)
        for note in info["llama_cpp_notes"]:
            err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@app.command("bench")
@handles_errors
def bench(
    package: Path = typer.Argument(..., help="Model package directory."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Budget for dense + experts + KV, e.g. 1GiB."),
    no_prefetch: bool = typer.Option(False, "--no-prefetch", help="Read experts only when a layer needs them."),
    lookahead: bool = typer.Option(True, "--lookahead/--no-lookahead",
                                   help="Also prefetch the next layer's likely experts (its router on this residual)."),
    storage_mbps: Optional[float] = typer.Option(None, "--storage-mbps", help="Simulate storage at N MB/s (eMMC/SATA SSD)."),
    storage_latency_us: float = typer.Option(0.0, "--storage-latency-us", help="Simulated latency per read."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    tokens: int = typer.Option(64, "--tokens", help="Tokens to decode."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="Prompt length."),
    policy: str = typer.Option("lru", "--policy", help="Expert cache policy: lru or lfu."),
    router_skew: float = typer.Option(0.0, "--router-skew", help="Zipf skew of router logits (stand-in for hot experts)."),
    as_json: bool = typer.Option(False, "--json", help="Print all figures as JSON."),
) -> None:
    """Measure decode/prefill speed, peak RSS and expert-cache counters of a package.

    Example: stctl model bench demo-v1 --memory-budget 8MiB --storage-mbps 500 --json
    """
    from model.bench import run_bench
    from model.expert_store import POLICIES
    from model.memory import parse_size

    if policy not in POLICIES:
        fail(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if tokens < 2 or prompt_tokens < 1:
        fail("--tokens must be >= 2 and --prompt-tokens >= 1")
    result = run_bench(package, memory_budget_bytes=parse_size(memory_budget) if memory_budget else None,
                       prefetch=not no_prefetch, lookahead=lookahead, storage_mbps=storage_mbps,
                       storage_latency_us=storage_latency_us,
                       threads=threads, tokens=tokens, prompt_tokens=prompt_tokens, policy=policy,
                       router_skew=router_skew)
    if as_json:
        print_json(result)
        return
    path = result["machine"]["kernel_path"]
    console.print(f"{result['model']} on {result['machine']['cpu']} ({result['machine']['threads']} threads, "
                  f"{result['machine']['kernel']} kernel{', ' + path['isa'] if path['isa'] else ''})", markup=False)
    if path["fallback_reason"]:
        console.print(f"warning: native kernels unavailable ({path['fallback_reason']}): slow fallback", markup=False)
    console.print(f"decode {result['decode_tokens_per_s']:.2f} tok/s, prefill {result['prefill_tokens_per_s']:.1f} tok/s, "
                  f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    console.print(f"experts: {result['expert_slots']}/{result['experts_total']} slots, hits {result['expert_cache_hits']}, "
                  f"misses {result['expert_cache_misses']}, prefetch hits {result['prefetch_hits']}, "
                  f"read {result['bytes_read'] / 2**20:.1f} MiB")
