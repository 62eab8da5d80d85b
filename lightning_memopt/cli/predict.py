"""``memopt predict``: run an exported model on a file of text; write labels and scores."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from lightning_memopt.deploy.predict import predict_file


def predict_command(argv: Sequence[str]) -> None:
    """``memopt predict --model FOLDER --input FILE [--output FILE]``: NER labels per word, or a label per text."""
    parser = ArgumentParser(prog="memopt predict", description=predict_command.__doc__, exit_on_error=False)
    parser.add_argument("--model", required=True, help="A folder written by memopt export (any --format).")
    parser.add_argument(
        "--input", required=True, help="CoNLL (.conll/.bio/.iob), a table (.tsv/.csv/.jsonl) or plain text."
    )
    parser.add_argument(
        "--output",
        default=None,
        help="Where to write (CoNLL for NER, JSON lines for classification); stdout if not given.",
    )
    parser.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "openvino"],
        help="auto: OpenVINO for openvino_model.xml, ONNX Runtime for model.onnx, else torch.",
    )
    parser.add_argument("--column", default="sentence", help="The text column of a table input.")
    parser.add_argument(
        "--input_format", default="auto", choices=["auto", "conll", "table", "text"], help="auto: by the file's suffix."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Examples per batch (batched by length).")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of ONNX Runtime (default: its own choice)."
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "f32"],
        help="OpenVINO: auto lets its CPU plugin choose (bf16 where the CPU has it); f32 keeps float32.",
    )
    args = parser.parse_args(list(argv))
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}.")
    predictions, task = predict_file(
        args.model,
        args.input,
        args.output,
        args.runtime,
        args.column,
        args.input_format,
        args.batch_size,
        args.threads,
        args.precision,
    )
    if args.output:
        what = "sentences" if task == "ner" else "texts"
        print(f"Predicted {len(predictions)} {what} with {args.model}; wrote {args.output}.")
