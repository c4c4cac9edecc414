"""``fedstack he``: CKKS key sets for homomorphic encryption (extra ``he``).

``keygen --out DIR`` writes ``DIR/agents.ctx`` (with the secret key, mode 0600: for the
agents only) and ``DIR/aggregator.ctx`` (the parameters only: for the aggregator);
``inspect FILE`` says what a key file holds without printing any key; ``encrypt`` and
``decrypt`` turn a plain model file into an encrypted one (a base model to register) and
an encrypted global model (``fedstack db export``) into a plain one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedstack.cli.options import JsonFlag
from fedstack.cli.output import print_json, quiet_logs
from fedstack.names import safe_text

__all__ = ["app"]

app = typer.Typer(
    help="CKKS key sets for homomorphic encryption (extra he)",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@app.command("keygen")
def cmd_keygen(
    out: Annotated[Path, typer.Option("--out", help="directory to write into (created)")],
    poly_modulus_degree: Annotated[
        int,
        typer.Option(
            "--poly-modulus-degree",
            help="CKKS ring degree N (4096, 8192, 16384, 32768): N/2 values per ciphertext",
        ),
    ] = 8192,
    coeff_mod_bit_sizes: Annotated[
        str,
        typer.Option(
            "--coeff-mod-bit-sizes",
            help="comma-separated bit sizes of the modulus primes (data primes, then the "
            "special prime)",
        ),
    ] = "60,40,60",
    scale_bits: Annotated[
        int, typer.Option("--scale-bits", help="log2 of the encoding scale (precision)")
    ] = 40,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing key set (a new run)")
    ] = False,
    json_: JsonFlag = False,
) -> int:
    """Make a CKKS key set: agents.ctx (secret key, for agents) and aggregator.ctx.

    Give agents.ctx to every agent out of band, as their credentials (agents run with
    --he-context agents.ctx); give aggregator.ctx to the aggregator (fedstack aggregator
    --he ckks --he-context aggregator.ctx). One key set per run: to rotate, start a new run.
    """
    from fedstack.errors import ConfigError
    from fedstack.privacy.ckks import CkksParams, ciphertext_bound, keygen, load_context

    try:
        bits = tuple(int(b) for b in coeff_mod_bit_sizes.split(","))
    except ValueError:
        raise ConfigError(
            f"--coeff-mod-bit-sizes {coeff_mod_bit_sizes!r} is refused: integers separated "
            "by commas, e.g. 60,40,60"
        ) from None
    params = CkksParams(poly_modulus_degree, bits, scale_bits)
    agents, aggregator = keygen(out, params, force=force)
    ctx = load_context(aggregator, "aggregator")
    info = {
        "agents": str(agents),
        "aggregator": str(aggregator),
        "key_id": ctx.key_id.hex(),
        **params.as_dict(),
        "values_per_ciphertext": ctx.data_slots,
        "ciphertext_bytes": ciphertext_bound(params),
    }
    if json_:
        quiet_logs()
        print_json(info)
        return 0
    print(safe_text(f"wrote key set {info['key_id']} into {out}:"))
    print(safe_text(f"  {agents}  secret key (mode 0600): give it to every agent, out of band"))
    print(safe_text(f"  {aggregator}  parameters only: give it to the aggregator"))
    print(
        f"  {ctx.data_slots} model values per ciphertext, {ciphertext_bound(params)} bytes "
        "each at most"
    )
    print("\nuse it:")
    print(safe_text(f"  fedstack aggregator --he ckks --he-context {aggregator} ..."))
    print(safe_text(f"  fedstack agent --he-context {agents} --name NAME --trainer ... "))
    return 0


@app.command("inspect")
def cmd_inspect(
    file: Annotated[Path, typer.Argument(help="a key file of `fedstack he keygen`")],
    json_: JsonFlag = False,
) -> int:
    """Say what a key file holds (role, key id, parameters, secret key or not)."""
    from fedstack.privacy.ckks import AGENTS_FILE, context_from_bytes, load_context

    try:
        ctx = load_context(file, "aggregator")
    except Exception as exc:
        if AGENTS_FILE not in str(exc):
            raise
        ctx = context_from_bytes(file.read_bytes(), "agents", str(file))
    info = {
        "file": str(file),
        "role": ctx.role,
        "secret_key": ctx.has_secret_key,
        "key_id": ctx.key_id.hex(),
        **ctx.params.as_dict(),
    }
    if json_:
        quiet_logs()
        print_json(info)
        return 0
    for k, v in info.items():
        print(safe_text(f"{k}: {v}"))
    return 0


ModelFormat = Annotated[
    str | None,
    typer.Option("--format", help="safetensors, npz or pt (default: from the file name)"),
]


def _fmt(value: str | None) -> Any:
    from fedstack.errors import ConfigError
    from fedstack.store.modelfiles import FORMATS

    if value is not None and value not in FORMATS:
        raise ConfigError(f"--format {value!r} is refused: one of {', '.join(FORMATS)}")
    return value


@app.command("encrypt")
def cmd_encrypt(
    file: Annotated[Path, typer.Argument(help="a plain model file (.safetensors, .npz, .pt)")],
    context: Annotated[Path, typer.Option("--context", help="the agents' key file agents.ctx")],
    out: Annotated[Path, typer.Option("--out", help="the encrypted model file to write")],
    format_: ModelFormat = None,
) -> int:
    """Encrypt a plain model file (weight 1): a base model to register in a --he ckks run.

    Register the output with `fedstack model register`: the agents decrypt it as their
    first global model."""
    from fedstack.privacy.ckks import encrypt_model, load_context
    from fedstack.store.modelfiles import detect_format, read_model_file, write_model_file

    ctx = load_context(context, "agents")
    weights, _ = read_model_file(file, _fmt(format_))
    enc = encrypt_model(ctx, weights, 1.0)
    write_model_file(enc, out, _fmt(format_) or detect_format(out, b""), {"fedstack": "ckks"})
    print(
        safe_text(
            f"wrote {out}: {len(weights)} tensors in {len(enc) - 1} ciphertexts under key "
            f"set {ctx.key_id.hex()}"
        )
    )
    return 0


@app.command("decrypt")
def cmd_decrypt(
    file: Annotated[
        Path, typer.Argument(help="an encrypted model file (e.g. from `fedstack db export`)")
    ],
    context: Annotated[Path, typer.Option("--context", help="the agents' key file agents.ctx")],
    like: Annotated[
        Path,
        typer.Option(
            "--like",
            help="a plain model file with the model's tensor names, dtypes and shapes "
            "(e.g. the trainer's initial model; its values are not used)",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="the plain model file to write")],
    format_: ModelFormat = None,
) -> int:
    """Decrypt an encrypted global model (sum / count) into a plain model file."""
    from fedstack.privacy.ckks import decrypt_model, load_context
    from fedstack.store.modelfiles import detect_format, read_model_file, write_model_file

    ctx = load_context(context, "agents")
    enc, _ = read_model_file(file)
    template, _ = read_model_file(like)
    plain, total, updates = decrypt_model(ctx, enc, template)  # CkksDecryptError: why not
    write_model_file(plain, out, _fmt(format_) or detect_format(out, b""))
    print(
        safe_text(
            f"wrote {out}: the mean of {updates} update(s) over {total:.6g} samples, "
            f"{len(plain)} tensors"
        )
    )
    return 0
