"""Deployable artefacts: export a model out of any checkpoint in every format the project writes."""

from lightning_memopt.deploy.export import ExportResult, export_checkpoint, export_model
from lightning_memopt.deploy.load import load_pretrained

__all__ = ["ExportResult", "export_checkpoint", "export_model", "load_pretrained"]
