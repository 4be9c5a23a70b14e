"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A problem with the user's input (a path, a config key, weights, data).

    The message is a single line that names the file or key and says what to do;
    the command-line edge prints it without a traceback.
    """
