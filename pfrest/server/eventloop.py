"""The one event loop of a pfrest process: uvloop where it is installed (Linux, macOS), asyncio's own
otherwise.  uvloop halves the CPU that each request costs on the request path (the README's design
notes give the figures)."""

import asyncio


def new_loop():
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main):
    """Run the coroutine ``main`` to its end on a new loop, then cancel whatever is left (a backend
    request the process no longer waits for) and close the loop."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
