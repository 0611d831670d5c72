"""ncf-stream: online Neural Collaborative Filtering from an event stream.

The engine. It never imports a Kafka client; ``consumers`` does that.
"""

from __future__ import annotations

__version__ = "0.1.0"
