package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"strings"
	"text/template"
)

type Meta struct {
	Name        string
	Namespace   string
	Annotations map[string]string
	Labels      map[string]string
}
type Req struct {
	Key      string   `json:"key"`
	Operator string   `json:"operator"`
	Values   []string `json:"values,omitempty"`
}
type Term struct {
	MatchExpressions []Req `json:"matchExpressions,omitempty"`
	MatchFields      []Req `json:"matchFields,omitempty"`
}
type NodeSel struct {
	NodeSelectorTerms []Term `json:"nodeSelectorTerms"`
}
type NodeAff struct {
	RequiredDuringSchedulingIgnoredDuringExecution *NodeSel `json:"requiredDuringSchedulingIgnoredDuringExecution,omitempty"`
}
type Affinity struct {
	NodeAffinity *NodeAff `json:"nodeAffinity,omitempty"`
}
type Container struct {
	Name string `json:"name"`
}
type Spec struct {
	Containers     []Container `json:"containers"`
	InitContainers []Container `json:"initContainers"`
	Affinity       *Affinity   `json:"affinity,omitempty"`
}
type ProxyConfig struct {
	InterceptionMode string
	ProxyMetadata    map[string]string
}
type MeshConfig struct {
	ProxyListenPort        int32
	ProxyInboundListenPort int32
}
type Data struct {
	ObjectMeta     Meta
	Spec           Spec
	Values         map[string]any
	ProxyConfig    ProxyConfig
	MeshConfig     MeshConfig
	ProxyImage     string
	ProxyInitImage string
	ProxyUID       int64
	ProxyGID       int64
	Revision       string
	NativeSidecars bool
}
type Input struct {
	Template string `json:"template"`
	Cases    []Data `json:"cases"`
}
type Output struct {
	Rendered string `json:"rendered"`
	Error    string `json:"error"`
}

func empty(v any) bool {
	if v == nil {
		return true
	}
	r := reflect.ValueOf(v)
	switch r.Kind() {
	case reflect.String, reflect.Map, reflect.Slice, reflect.Array:
		return r.Len() == 0
	case reflect.Bool:
		return !r.Bool()
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return r.Int() == 0
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return r.Uint() == 0
	case reflect.Float32, reflect.Float64:
		return r.Float() == 0
	case reflect.Ptr, reflect.Interface:
		return r.IsNil()
	}
	return false
}

func indent(n int, s string) string {
	pad := strings.Repeat(" ", n)
	return pad + strings.ReplaceAll(s, "\n", "\n"+pad)
}

func funcs() template.FuncMap {
	return template.FuncMap{
		"default": func(d any, given ...any) any {
			if len(given) == 0 || empty(given[0]) {
				return d
			}
			return given[0]
		},
		"quote": func(s ...any) string {
			out := []string{}
			for _, v := range s {
				if v != nil {
					out = append(out, fmt.Sprintf("%q", fmt.Sprint(v)))
				}
			}
			return strings.Join(out, " ")
		},
		"contains": func(sub, s string) bool { return strings.Contains(s, sub) },
		"list":     func(v ...any) []any { return v },
		"toYaml": func(v any) string { // JSON is YAML
			b, _ := json.Marshal(v)
			return string(b)
		},
		"indent":  indent,
		"nindent": func(n int, s string) string { return "\n" + indent(n, s) },
		"omitNil": func(m map[string]any) map[string]any {
			out := map[string]any{}
			for k, v := range m {
				if v != nil {
					out[k] = v
				}
			}
			return out
		},
		"isset": func(m map[string]string, k string) bool { _, ok := m[k]; return ok },
		"annotation": func(meta Meta, name string, def any) string {
			if v, ok := meta.Annotations[name]; ok {
				return v
			}
			return fmt.Sprint(def)
		},
		"valueOrDefault": func(v any, d any) any {
			if empty(v) {
				return d
			}
			return v
		},
		"excludeInboundPort": func(port any, excluded string) string {
			p := strings.TrimSpace(fmt.Sprint(port))
			if p == "" || p == "0" {
				return excluded
			}
			parts := []string{}
			for _, x := range strings.Split(excluded, ",") {
				x = strings.TrimSpace(x)
				if x == p {
					return excluded
				}
				if x != "" {
					parts = append(parts, x)
				}
			}
			return strings.Join(append(parts, p), ",")
		},
		"structToJSON": func(v any) string {
			b, err := json.Marshal(v)
			if err != nil {
				return "{}"
			}
			return string(b)
		},
	}
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(3)
	}
	t, err := template.New("inject").Funcs(funcs()).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(4)
	}
	out := []Output{}
	for _, c := range in.Cases {
		var buf bytes.Buffer
		if err := t.Execute(&buf, c); err != nil {
			out = append(out, Output{Error: err.Error()})
		} else {
			out = append(out, Output{Rendered: buf.String()})
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
