"""The one error the imaging layer raises for inputs the node cannot take."""


class ImagingError(Exception):
    """An input the node refuses; ``str(error)`` is one human line naming the file and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
