"""Multi-task heads; importing this package registers every built-in head in ``pimm_model.registry``."""

from pimm_model.models import aitm, esmm, linear, mmoe, mncm, pimm, ple, shared_bottom  # noqa: F401
