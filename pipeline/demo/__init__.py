"""The bundled demo (`make demo`, `rqpipe demo`): its dataset of drawn shapes, the run, and the
class check of the samples."""
