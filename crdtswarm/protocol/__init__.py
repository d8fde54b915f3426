"""Sans-IO protocol cores: no anyio, no asyncio, no sockets; time comes in as ``now``."""
