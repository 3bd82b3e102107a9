"""Host-neutral file I/O: atomic writes, the MRC stack writer, the problem report."""
