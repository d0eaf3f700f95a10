"""The transport's types, named here once so that the layers above ``bus`` never import nats."""

from nats.aio.client import Client as Connection
from nats.aio.msg import Msg as Message
from nats.aio.subscription import Subscription
from nats.errors import Error as TransportError

__all__ = ["Connection", "Message", "Subscription", "TransportError"]
