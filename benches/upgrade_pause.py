#!/usr/bin/env python3
"""What one client sees during a binary upgrade with a supervised instance (ADR 0003).

usage: benches/upgrade_pause.py STREAM_MS LOAD_MS   (e.g. 3000 2000; BIN_DIR defaults to
target/debug, built with `cargo build --bins`). A probe sends a short /api/chat every 100 ms;
a stream of STREAM_MS is in flight at SIGQUIT; the mock loads a model in LOAD_MS. Prints the
old process's exit time, the probes' errors and the worst probe latency after SIGQUIT.
"""
import subprocess, threading, time, urllib.request, os, socket, sys, signal, tempfile
W=os.environ.get("BIN_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "debug"))
def free():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
P,A,M=free(),free(),free()
stream_ms=int(sys.argv[1]); load_ms=int(sys.argv[2])
cfg=f"""listen: 127.0.0.1:{P}
admin:
  listen: 127.0.0.1:{A}
shutdown:
  drain_timeout: 30s
instances:
  - name: sup
    command: {W}/mock-ollama
    port: {M}
    num_parallel: 4
    env:
      MOCK_TOKENS: "{max(1,stream_ms//50)}"
      MOCK_TOKEN_DELAY_MS: "50"
      MOCK_LOAD_DELAY_MS: "{load_ms}"
"""
os.chdir(tempfile.mkdtemp()); open("c.yaml","w").write(cfg)
sock=os.path.abspath("up.sock")
env=dict(os.environ, RUST_LOG="info")
old=subprocess.Popen([f"{W}/ollama-sidecar","--config","c.yaml","--upgrade-sock",sock],stderr=open("old.log","w"),env=env)
def req(body,path="/api/chat"):
    t=time.time()
    try:
        r=urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{P}{path}",data=body.encode()),timeout=60); r.read(); ok=r.status
    except Exception as e: ok=repr(e)
    return ok,(time.time()-t)*1000
chat='{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":1}}'
for _ in range(100):
    if req(chat)[0]==200: break
    time.sleep(0.1)
req(chat)  # model loaded
res=[]; stop=False
def probe():
    while not stop:
        t0=time.time(); ok,ms=req(chat); res.append((t0,ok,ms)); time.sleep(0.1)
th=threading.Thread(target=probe); th.start()
time.sleep(1)
sres=[]
st=threading.Thread(target=lambda: sres.append(req('{"model":"llama3.2","prompt":"story"}',"/api/generate"))); st.start()
time.sleep(0.3)
new=subprocess.Popen([f"{W}/ollama-sidecar","--config","c.yaml","--upgrade","--upgrade-sock",sock],stderr=open("new.log","w"),env=env)
while not os.path.exists(sock): time.sleep(0.02)
tq=time.time(); old.send_signal(signal.SIGQUIT)
old.wait(); t_old=time.time()-tq
time.sleep(6); stop=True; th.join(); st.join()
before=[ms for t,ok,ms in res if t<tq and ok==200]
after=[(round(t-tq,2),ok,round(ms)) for t,ok,ms in res if t>=tq]
errs=[r for r in res if r[1]!=200]
print(f"stream {stream_ms}ms in flight, model load {load_ms}ms: old exit {t_old*1000:.0f} ms after SIGQUIT (rc {old.returncode}); stream {sres}")
print(f"probe latency before: max {max(before):.0f} ms; errors {len(errs)}; worst after SIGQUIT: {max(a[2] for a in after)} ms")
print("first probes after SIGQUIT:", after[:6])
new.send_signal(signal.SIGTERM); new.wait(); print("new rc", new.returncode)
