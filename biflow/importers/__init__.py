"""Importers: checkpoints made by other implementations, written as biflow checkpoints (ml-tarflow's TARFlow)."""
from biflow.importers.tarflow import import_tarflow, tarflow_flow, tarflow_logdet

__all__ = ["import_tarflow", "tarflow_flow", "tarflow_logdet"]
