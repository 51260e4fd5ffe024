"""64 concurrent scrapers of 127.0.0.1:9464 for ARGV[1] seconds, each pausing ARGV[2] s between scrapes."""
import asyncio, sys, time
async def one(end, n):
    while time.time() < end:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", 9464)
            w.write(b"GET /metrics HTTP/1.0\r\n\r\n"); await w.drain()
            await r.read(); w.close(); n[0] += 1
        except Exception:
            n[1] += 1
        await asyncio.sleep(float(sys.argv[2]))
async def main():
    end = time.time() + float(sys.argv[1]); n = [0, 0]
    await asyncio.gather(*[one(end, n) for _ in range(64)])
    print("scrapes", n[0], "failed", n[1], "scrapers cpu %.2f s" % time.process_time())
asyncio.run(main())
