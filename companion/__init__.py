"""companion: 2D classification companion for cryo-EM (RELION and CryoSPARC)."""

__version__ = "0.1.0"
