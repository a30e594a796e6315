"""Convert an official MambaVision checkpoint to a directory that ``mambavision_jax.from_pretrained`` reads.

    python convert_torch_weights.py --model mamba_vision_T --input mambavision_tiny_1k.pth.tar --output tiny_jax
    python convert_torch_weights.py --model mamba_vision_B --input model.safetensors --output base_jax
    python convert_torch_weights.py --model mamba_vision_L --output large_jax   # downloads nvidia/MambaVision-L-1K

The input is an official ``.pth``/``.pth.tar`` (needs PyTorch; ``--ema`` takes ``state_dict_ema``) or a Hugging
Face ``model.safetensors`` (no PyTorch needed); without ``--input`` the official checkpoint of ``--model`` is
downloaded from the Hugging Face Hub (needs ``huggingface_hub``, the ``hub`` extra). The output directory holds
an Orbax checkpoint of the Flax variables and ``mambavision.json`` (model name and preprocessing). The
conversion is strict: a checkpoint with missing, unexpected or mis-shaped keys is refused with every offending
key named, and nothing is written.
"""

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registry name or alias, e.g. mamba_vision_T")
    parser.add_argument(
        "--input", default=None, help="official .pth/.pth.tar or Hugging Face .safetensors (default: download it)"
    )
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--ema", action="store_true", help="convert state_dict_ema (training checkpoints)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier conversion at --output (other non-empty directories are refused)",
    )
    args = parser.parse_args(argv)

    import mambavision_jax as mvj
    from mambavision_jax.weights import save_converted
    from mambavision_jax.weights.hub import download_official

    try:
        source = args.input or download_official(args.model)
        module, variables = mvj.from_pretrained(args.model, source, ema=args.ema)
        save_converted(args.output, args.model, variables, source=source, ema=args.ema, overwrite=args.overwrite)
    except (ValueError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    count = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(variables["params"]))
    print(
        f"wrote {args.output}: {mvj.models.resolve_name(args.model)}, {count:,} parameters"
        f"{' (EMA)' if args.ema else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
