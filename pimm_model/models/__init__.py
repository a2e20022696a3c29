"""Multi-task heads; importing this package registers every built-in head in ``pimm_model.registry``."""

from pimm_model.models import pimm  # noqa: F401
