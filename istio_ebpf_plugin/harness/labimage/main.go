// labapp: the one static binary of the node lab's app and proxy images.
//
//	app serve NAME PORT          HTTP server answering {"pod","local","remote"} (local = the address
//	                             the connection really arrived at: the original destination)
//	app front NAME PORT          HTTP server whose /fetch?url=U makes one new connection to U and
//	                             relays the answer (502 on failure): the app behind the sidecar; its
//	                             outbound sockets carry TOS 0x20 (Envoy does not copy it upstream)
//	app dns NAME PORT HOST       serve's HTTP server on PORT, and a DNS server on UDP 53 answering
//	                             HOST's A record with $POD_IP (other names: NXDOMAIN; needs root)
//	app fetch HOST PORT SECONDS  an app init container: resolves HOST (the pod's resolv.conf) and
//	                             GETs http://<its address>:PORT/, again every 0.3 s until an answer
//	                             or SECONDS have passed: exit 0 on the first answer, 1 without one
//	pilot-agent proxy sidecar …  stand-in for Istio's pilot-agent: execs Envoy with the lab bootstrap
//	pilot-agent istio-iptables …  stand-in for istio-init: loads the rules the lab rendered from the same
//	                             arguments ($ISTIO_LAB_IPTABLES_RULES) with iptables-restore
//	pilot-agent istio-iptables … --run-validation
//	                             stand-in for Istio's istio-iptables validation: listens on
//	                             127.0.0.1:<-p> and :<-z>, connects to 127.0.0.6:15002 and passes only
//	                             when a connection arrives captured with original port 15002
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const soOriginalDst = 80 // SO_ORIGINAL_DST (linux/netfilter_ipv4.h)

// AppTOS marks the front app's outbound sockets (IP_TOS / IPV6_TCLASS).
const AppTOS = 0x20

func markTOS(network, address string, c syscall.RawConn) error {
	var err error
	c.Control(func(fd uintptr) {
		if strings.HasSuffix(network, "6") {
			err = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_TCLASS, AppTOS)
		} else {
			err = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_TOS, AppTOS)
		}
	})
	return err
}

func main() {
	args := os.Args[1:]
	if filepath.Base(os.Args[0]) == "pilot-agent" {
		os.Exit(pilotAgent(args))
	}
	if len(args) == 3 && (args[0] == "serve" || args[0] == "front") {
		os.Exit(serveHTTP(args[0], args[1], args[2]))
	}
	if len(args) == 4 && args[0] == "dns" {
		go serveDNS(args[3], net.ParseIP(os.Getenv("POD_IP")).To4())
		os.Exit(serveHTTP("serve", args[1], args[2]))
	}
	if len(args) == 4 && args[0] == "fetch" {
		os.Exit(fetch(args[1], args[2], args[3]))
	}
	fmt.Fprintln(os.Stderr, "usage: app serve|front|dns NAME PORT [HOST] | app fetch HOST PORT SECONDS | pilot-agent proxy sidecar ... | pilot-agent istio-iptables ...")
	os.Exit(2)
}

func serveHTTP(mode, name, port string) int {
	// The app's own connections carry TOS AppTOS, which Envoy does not copy to its upstream
	// connections: a SYN with it at the server went around the sidecar (the upgrade e2e sniffs).
	dialer := &net.Dialer{Timeout: 5 * time.Second, Control: markTOS}
	client := &http.Client{Timeout: 5 * time.Second,
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil, DialContext: dialer.DialContext}}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		local := ""
		if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			local = a.String()
		}
		if mode == "front" && r.URL.Path == "/fetch" {
			resp, err := client.Get(r.URL.Query().Get("url"))
			if err != nil {
				http.Error(w, "fetch failed: "+err.Error(), http.StatusBadGateway)
				return
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(resp.StatusCode)
			w.Write(body)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"pod": name, "local": local, "remote": r.RemoteAddr})
	})
	fmt.Printf("%s %s listening on :%s\n", mode, name, port)
	if err := http.ListenAndServe(":"+port, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// serveDNS answers A queries for host with ip on UDP 53 (RFC 1035: one question, one answer).
func serveDNS(host string, ip net.IP) {
	if ip == nil {
		fmt.Fprintln(os.Stderr, "dns: $POD_IP is not an IPv4 address")
		os.Exit(1)
	}
	pc, err := net.ListenPacket("udp", ":53")
	if err != nil {
		fmt.Fprintln(os.Stderr, "dns:", err)
		os.Exit(1)
	}
	fmt.Printf("dns answering %s A %s on :53\n", host, ip)
	want := strings.ToLower(strings.TrimSuffix(host, ".")) + "."
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			continue
		}
		q := buf[:n]
		if n < 12 || binary.BigEndian.Uint16(q[4:6]) < 1 {
			continue
		}
		name, off := "", 12
		for off < n && q[off] != 0 && off+1+int(q[off]) < n {
			name += strings.ToLower(string(q[off+1:off+1+int(q[off])])) + "."
			off += 1 + int(q[off])
		}
		if off+5 > n || q[off] != 0 {
			continue
		}
		qtype, end := binary.BigEndian.Uint16(q[off+1:off+3]), off+5
		resp := append([]byte{}, q[:end]...)
		resp[2] = 0x84 | q[2]&0x79 // QR, AA; the query's opcode and RD
		resp[3] = 0x80             // RA, NOERROR
		binary.BigEndian.PutUint16(resp[4:6], 1)
		binary.BigEndian.PutUint16(resp[6:8], 0)
		binary.BigEndian.PutUint16(resp[8:10], 0)
		binary.BigEndian.PutUint16(resp[10:12], 0)
		switch {
		case name != want:
			resp[3] |= 3 // NXDOMAIN
		case qtype == 1: // A, class IN, TTL 5
			binary.BigEndian.PutUint16(resp[6:8], 1)
			resp = append(resp, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4)
			resp = append(resp, ip...)
		}
		pc.WriteTo(resp, from)
	}
}

// fetch is an app init container: resolve host, fetch from it, retry until the deadline. Each attempt
// prints one line: "attempt N: resolved HOST -> IP; fetched: BODY" or why it failed (refused, timeout).
func fetch(host, port, seconds string) int {
	secs, _ := strconv.Atoi(seconds)
	deadline := time.Now().Add(time.Duration(secs) * time.Second)
	resolver := &net.Resolver{PreferGo: true}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		addrs, err := resolver.LookupHost(ctx, host)
		cancel()
		if err != nil {
			fmt.Printf("attempt %d: resolve failed: %v\n", attempt, err)
		} else {
			resp, err := client.Get("http://" + net.JoinHostPort(addrs[0], port) + "/")
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				fmt.Printf("attempt %d: resolved %s -> %s; fetched: %s\n", attempt, host, addrs[0],
					strings.TrimSpace(string(body)))
				return 0
			}
			why := "error"
			var nerr net.Error
			if errors.Is(err, syscall.ECONNREFUSED) {
				why = "refused"
			} else if errors.As(err, &nerr) && nerr.Timeout() {
				why = "timeout"
			}
			fmt.Printf("attempt %d: resolved %s -> %s; fetch %s: %v\n", attempt, host, addrs[0], why, err)
		}
		if time.Now().After(deadline) {
			fmt.Printf("no answer in %s s\n", seconds)
			return 1
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func pilotAgent(args []string) int {
	if len(args) >= 2 && args[0] == "proxy" && args[1] == "sidecar" {
		envoy := []string{"/usr/local/bin/envoy", "-c", "/etc/istio-lab/bootstrap.json",
			"--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"}
		err := syscall.Exec(envoy[0], envoy, os.Environ())
		fmt.Fprintln(os.Stderr, "pilot-agent stand-in: exec envoy:", err)
		return 1
	}
	if len(args) >= 1 && args[0] == "istio-iptables" {
		return istioIptables(args[1:])
	}
	fmt.Fprintf(os.Stderr, "pilot-agent stand-in: unsupported arguments %q\n", args)
	return 2
}

func flagValue(args []string, name, def string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return def
}

func has(args []string, name string) bool {
	for _, a := range args {
		if a == name {
			return true
		}
	}
	return false
}

// istioIptables mirrors istio-iptables --run-validation (tools/istio-iptables/pkg/validation):
// listeners on the outbound and inbound capture ports, a client to 127.0.0.6:15002, and the
// server's SO_ORIGINAL_DST must say port 15002.
func istioIptables(args []string) int {
	if !has(args, "--run-validation") {
		return applyRules()
	}
	ports := []string{flagValue(args, "-p", "15001"), flagValue(args, "-z", "15006")}
	result := make(chan string, 8)
	for _, p := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:"+p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "Error listening:", err)
			return 1
		}
		go acceptLoop(ln, result)
	}
	deadline := time.Now().Add(5 * time.Second)
	if s := os.Getenv("VALIDATION_TIMEOUT_SECONDS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil {
			deadline = time.Now().Add(time.Duration(n) * time.Second)
		}
	}
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", "127.0.0.6:15002", time.Second)
		if err == nil {
			c.Write([]byte("validation\n"))
			c.Close()
			select {
			case got := <-result:
				if got == "15002" {
					fmt.Println("Validation passed, iptables rules established")
					return 0
				}
				fmt.Printf("Validation failed: original port %s, want 15002\n", got)
			case <-time.After(time.Second):
				fmt.Println("Validation failed: connection did not arrive at a capture port")
			}
		} else {
			fmt.Println("Error connecting to 127.0.0.6:15002:", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	fmt.Println("Validation failed: iptables rules (here: eBPF capture) are not in place")
	return 1
}

// applyRules stands in for istio-init: Istio's istio-iptables renders its rules and loads them with
// iptables-restore. The lab renders the same rules from the same arguments (harness/istio_iptables.py,
// checked against Istio's golden files) into $ISTIO_LAB_IPTABLES_RULES (and $ISTIO_LAB_IP6TABLES_RULES),
// and this loads them the same way, in the pod's network namespace.
func applyRules() int {
	for _, r := range []struct{ env, tool string }{
		{"ISTIO_LAB_IPTABLES_RULES", "/usr/sbin/iptables-restore"},
		{"ISTIO_LAB_IP6TABLES_RULES", "/usr/sbin/ip6tables-restore"},
	} {
		rules := os.Getenv(r.env)
		if rules == "" {
			if r.tool == "/usr/sbin/iptables-restore" {
				fmt.Fprintln(os.Stderr, "istio-iptables stand-in: $ISTIO_LAB_IPTABLES_RULES is empty")
				return 1
			}
			continue
		}
		cmd := exec.Command(r.tool, "--noflush")
		cmd.Stdin = strings.NewReader(rules)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "istio-iptables stand-in:", r.tool, err)
			return 1
		}
	}
	fmt.Println("iptables rules applied (istio-iptables stand-in)")
	return 0
}

func acceptLoop(ln net.Listener, result chan<- string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		port := "unknown"
		if tc, ok := c.(*net.TCPConn); ok {
			if raw, err := tc.SyscallConn(); err == nil {
				raw.Control(func(fd uintptr) {
					// struct sockaddr_in through the IPv6 mreq getter (16 bytes suffice: family, port, addr).
					mreq, err := syscall.GetsockoptIPv6Mreq(int(fd), syscall.SOL_IP, soOriginalDst)
					if err == nil {
						port = strconv.Itoa(int(mreq.Multiaddr[2])<<8 | int(mreq.Multiaddr[3]))
					} else {
						port = "error:" + strings.TrimSpace(err.Error())
					}
				})
			}
		}
		c.Close()
		select {
		case result <- port:
		default:
		}
	}
}
