"""The errors a user causes: a setting, a model or a file that cannot work together. Each names what is wrong, and
``fields`` lists the config fields it is about, so that a caller that knows where each field came from (the recipe
kit: a yaml file or the command line) can say so. Everything else the library raises is a bug to report."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user typed or pointed at; ``fields`` names the config fields involved, if any
    (``r``, ``target_modules``; a recipe section prefix such as ``adapter.`` where the raiser knows it)."""

    def __init__(self, message: str, fields: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


class ModelMismatchError(UserError):
    """A config valid on its own that the model it is applied to contradicts: target modules that match nothing, a
    rank larger than a target matrix allows, a b0 larger than the matrices can honour, a model already adapted."""


class AdapterFileError(UserError):
    """A saved adapter that cannot be loaded into this model (missing, unreadable, non-finite or mismatched tensors);
    the message names the file and, where there is one, the tensor."""
