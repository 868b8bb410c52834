"""The recipes' data sets: commonsense (LLM-Adapters format), GLUE (original tsv files or the hub), VTAB-1k."""


class DataError(ValueError):
    """A data file or row the recipes cannot train on; the message names the file (and the row where there is one).

    The recipes' entry point prints it as a one-line user error instead of a traceback.
    """
