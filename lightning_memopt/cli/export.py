"""``memopt export``: write a checkpoint's model as a folder plain ``transformers`` loads (or int8, sparse, shrunk)."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from lightning_memopt.deploy.export import export_checkpoint


def export_command(argv: Sequence[str]) -> None:
    """``memopt export``: write a checkpoint's model as a folder plain ``transformers`` loads."""
    parser = ArgumentParser(prog="memopt export", description=export_command.__doc__, exit_on_error=False)
    parser.add_argument(
        "--ckpt_path", required=True, help="A checkpoint of any LightningModule that holds a transformers model."
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write (created if missing; must be empty).")
    parser.add_argument(
        "--overwrite", type=bool, default=False, help="Replace an --output_dir that holds files, as a whole."
    )
    parser.add_argument(
        "--sparse",
        type=bool,
        default=False,
        help="Also write model.sparse.safetensors: pruned weights as non-zero values plus a 1-bit mask.",
    )
    parser.add_argument(
        "--shrink",
        type=bool,
        default=False,
        help="Cut structurally pruned feed-forward neurons and attention heads out of the model (smaller, faster). "
        "The kept heads are recorded in config.json (memopt_shrunk): load the folder with "
        "lightning_memopt.load_pretrained; with neurons cut only, plain transformers loads it too.",
    )
    parser.add_argument(
        "--int8",
        type=bool,
        default=False,
        help="Write an int8 model (model.int8.safetensors, read with lightning_memopt.quantization.load_int8) instead "
        "of a float one: the layers and weight scales of a QuantizationAwareTraining run, or post-training dynamic "
        "quantization of the encoder's Linear layers for a run without QAT.",
    )
    parser.add_argument(
        "--format",
        default="transformers",
        choices=["transformers", "onnx", "openvino"],
        help="transformers: a folder from_pretrained loads; onnx: model.onnx (opset 18, dynamic axes); openvino: "
        "OpenVINO IR; each with the tokenizer and label map beside it and checked against the torch model (needs the "
        "deploy extra). With --int8: ONNX Runtime's dynamic int8 (static with --calibration_file), or NNCF's post-training int8 for "
        "OpenVINO.",
    )
    parser.add_argument(
        "--calibration_file",
        default=None,
        help="--int8 with --format openvino (NNCF) or onnx (ONNX Runtime's static int8 instead of dynamic): "
        "sentences the activation ranges are calibrated on (CoNLL, a table or plain text, as memopt predict reads "
        "them); your training data is best.",
    )
    parser.add_argument(
        "--embedding_bits",
        type=int,
        default=8,
        choices=[8, 4],
        help="--format openvino --int8 true: 4 stores the embedding tables in int4 (NNCF weight compression, a scale "
        "and zero point per 128 values of a row) instead of NNCF's int8 rows, about half their size.",
    )
    parser.add_argument(
        "--min_agreement",
        type=float,
        default=0.995,
        help="--format onnx --int8: the share of parity positions where the int8 model must pick torch's label.",
    )
    parser.add_argument(
        "--model_source",
        default=None,
        help="For a checkpoint that does not name its model (no model_name_or_path hyper-parameter): the hub name "
        "or folder of its transformers model.",
    )
    parser.add_argument(
        "--model_prefix",
        default=None,
        help="The model's attribute in the LightningModule, e.g. 'model.' (found if not given).",
    )
    args = parser.parse_args(list(argv))
    calibration = None
    if args.calibration_file:
        from lightning_memopt.deploy.predict import read_texts

        calibration = read_texts(args.calibration_file)
    result = export_checkpoint(
        args.ckpt_path,
        args.output_dir,
        int8=args.int8,
        sparse=args.sparse,
        shrink=args.shrink,
        overwrite=args.overwrite,
        model_source=args.model_source,
        prefix=args.model_prefix,
        format=args.format,
        min_agreement=args.min_agreement,
        calibration=calibration,
        embedding_bits=args.embedding_bits,
    )
    print(f"Exported to {result.folder}:")
    for line in result.lines:
        print(f"  {line}")
