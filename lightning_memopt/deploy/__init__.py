"""Deployable artefacts: export a model out of any checkpoint in every format the project writes."""

from lightning_memopt.deploy.export import ExportResult, export_checkpoint

__all__ = ["ExportResult", "export_checkpoint"]
