"""The API version this client was generated for, and the compatibility rule both sides apply."""

# "1.MINOR": the major changes only with a new proto package (patchscope.v2); the minor grows as fields and
# methods are added.
API_VERSION = "1.3"  # 1.1: controls; 1.2: GenerationOptions.stop; 1.3: mean-state control, unpatched_top_k
METADATA_KEY = "patchscope-api-version"


def parse(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"API version {version!r} is not MAJOR.MINOR")
    return int(major), int(minor)


def compatible(server: str, client: str = API_VERSION) -> bool:
    """A server serves a client when the majors match and the server's minor is at least the client's."""
    (s_major, s_minor), (c_major, c_minor) = parse(server), parse(client)
    return s_major == c_major and s_minor >= c_minor
