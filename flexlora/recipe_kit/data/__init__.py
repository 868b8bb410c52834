"""The recipes' data sets: commonsense (LLM-Adapters format), GLUE (original tsv files or the hub), VTAB-1k."""

from flexlora.errors import UserError


class DataError(UserError):
    """A data file or row the recipes cannot train on; the message names the file (and the row where there is one).

    The recipes' entry point prints it as a one-line user error instead of a traceback.
    """


def load_hub_dataset(key: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; a hub data set that cannot be reached (offline and not cached),
    does not exist, or lacks the split is a DataError naming the setting ``key`` that named it."""
    from datasets import load_dataset  # only hub data sets need it

    try:
        return load_dataset(*args, **kwargs)
    except (OSError, ValueError) as error:  # ConnectionError / DatasetNotFoundError; ValueError: an unknown split
        raise DataError(f"{key} {args[0]}: {str(error).splitlines()[0]}", [key]) from error
